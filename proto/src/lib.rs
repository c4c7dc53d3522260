//! Generated types of the wire contract. The `.proto` files beside this crate
//! are the only definition; other crates convert to their own domain types at
//! their edge.

/// Router <-> worker gRPC services (`pdserve.worker.v1`).
pub mod worker {
    tonic::include_proto!("pdserve.worker.v1");
}

/// kv-transfer frames between decode and prefill workers (`pdserve.kv.v1`).
pub mod kv {
    tonic::include_proto!("pdserve.kv.v1");
}

/// What workers register in etcd for routers to find (`pdserve.discovery.v1`).
pub mod discovery {
    tonic::include_proto!("pdserve.discovery.v1");
}
