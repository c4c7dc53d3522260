//! The `Worker` gRPC service every worker serves.

use engine::EngineHandle;
use kv_transfer::KvConnector;
use proto::worker as pb;
use tonic::{Request, Response, Status};

/// Model card and stats of one worker.
#[derive(Clone)]
pub struct WorkerService {
    card: pb::ModelCard,
    engine: EngineHandle,
    /// The KV server of a prefill worker, whose pins the stats report.
    connector: Option<KvConnector>,
}

impl WorkerService {
    pub fn new(card: pb::ModelCard, engine: EngineHandle, connector: Option<KvConnector>) -> Self {
        Self { card, engine, connector }
    }
}

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    async fn get_model_card(&self, _: Request<pb::GetModelCardRequest>) -> Result<Response<pb::ModelCard>, Status> {
        Ok(Response::new(self.card.clone()))
    }

    async fn get_stats(&self, _: Request<pb::GetStatsRequest>) -> Result<Response<pb::WorkerStats>, Status> {
        let stats = self.engine.stats();
        let pins = self.connector.as_ref().map(|c| c.stats()).unwrap_or_default();
        Ok(Response::new(pb::WorkerStats {
            num_sequences: stats.num_sequences as u32,
            free_blocks: stats.free_blocks as u32,
            total_blocks: stats.total_blocks as u32,
            // The engine's count, not the pin table's: a block held without a pin is a leak to see.
            pinned_blocks: stats.held_blocks as u32,
            pinned_requests: pins.requests as u32,
        }))
    }
}
