//! The worker's side of discovery: `--etcd` flags and the registration a
//! worker keeps in etcd while it serves (`cluster::discovery`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub use cluster::discovery::Role;
use cluster::discovery::{self, EtcdConfig, Registration, WorkerRegistration};
use proto::worker as pb;

/// How a worker announces itself.
#[derive(Debug, Clone, clap::Args)]
pub struct DiscoveryArgs {
    /// etcd client URLs (comma-separated or repeated) to register in; none:
    /// routers find this worker by their static `--prefill` / `--decode` lists.
    #[arg(long, value_name = "URL", value_delimiter = ',', env = "PDSERVE_ETCD")]
    pub etcd: Vec<String>,
    /// Key prefix of the cluster in etcd; routers must watch the same one.
    #[arg(long, default_value = discovery::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// Seconds the registration outlives this process if it dies without
    /// deregistering (the etcd lease TTL).
    #[arg(long, default_value_t = discovery::DEFAULT_LEASE_TTL.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub etcd_lease_ttl_secs: u64,
    /// Host routers (and decode workers) reach this worker at; defaults to the
    /// listen IP, and is required when that is a wildcard such as 0.0.0.0.
    #[arg(long, env = "PDSERVE_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
}

/// Why the worker cannot register.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// Listening on every interface leaves no address to publish.
    #[error("--advertise-host is required with --etcd when listening on {0} (a wildcard address)")]
    NoAdvertiseHost(IpAddr),
    /// The registration was refused before it started.
    #[error(transparent)]
    Discovery(#[from] discovery::DiscoveryError),
}

/// What a worker publishes beyond its model card.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// The gRPC server's bound address.
    pub grpc: SocketAddr,
    /// Each rank's kv-transfer address (`host:port`), prefill workers only.
    pub kv: Vec<String>,
    /// The health / metrics HTTP server's bound address, if any.
    pub http: Option<SocketAddr>,
}

impl DiscoveryArgs {
    /// The host to publish for a server bound to `ip`.
    pub fn host_for(&self, ip: IpAddr) -> Result<String, AnnounceError> {
        match &self.advertise_host {
            Some(host) => Ok(host.clone()),
            None if ip.is_unspecified() => Err(AnnounceError::NoAdvertiseHost(ip)),
            None => Ok(ip.to_string()),
        }
    }

    /// Starts keeping this worker registered, or `None` without `--etcd`.
    pub fn announce(
        &self,
        role: Role,
        card: &pb::ModelCard,
        tensor_parallel_size: usize,
        endpoints: &Endpoints,
    ) -> Result<Option<Registration>, AnnounceError> {
        if self.etcd.is_empty() {
            return Ok(None);
        }
        let url = |addr: SocketAddr| -> Result<String, AnnounceError> {
            Ok(format!("http://{}", host_port(&self.host_for(addr.ip())?, addr.port())))
        };
        let registration = WorkerRegistration {
            instance_id: format!(
                "{}-{}",
                role.as_str_name().trim_start_matches("ROLE_").to_lowercase(),
                uuid::Uuid::new_v4()
            ),
            role: role as i32,
            model_name: card.model_name.clone(),
            grpc_url: url(endpoints.grpc)?,
            tensor_parallel_size: u32::try_from(tensor_parallel_size).unwrap_or(u32::MAX),
            block_size: card.block_size,
            context_length: card.context_length,
            kv_endpoints: endpoints.kv.clone(),
            http_url: endpoints.http.map(url).transpose()?.unwrap_or_default(),
        };
        tracing::info!(instance_id = registration.instance_id, grpc_url = registration.grpc_url, "registering in etcd");
        let config = EtcdConfig { endpoints: self.etcd.clone(), prefix: self.etcd_prefix.clone() };
        Ok(Some(discovery::register(config, registration, Duration::from_secs(self.etcd_lease_ttl_secs))?))
    }
}

/// `host:port`, with an IPv6 host in brackets.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        discovery: DiscoveryArgs,
    }

    fn endpoints(grpc: &str) -> Endpoints {
        Endpoints { grpc: grpc.parse().unwrap(), kv: vec![], http: None }
    }

    #[test]
    fn without_etcd_nothing_registers() {
        let flags = Flags::try_parse_from(["w"]).unwrap();
        let card = pb::ModelCard::default();
        assert!(flags.discovery.announce(Role::Decode, &card, 1, &endpoints("0.0.0.0:7001")).unwrap().is_none());
    }

    #[test]
    fn a_wildcard_listen_address_needs_an_advertised_host() {
        let flags = Flags::try_parse_from(["w", "--etcd", "http://127.0.0.1:1"]).unwrap();
        let err = flags.discovery.host_for("0.0.0.0".parse().unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--advertise-host is required with --etcd when listening on 0.0.0.0 (a wildcard address)"
        );
        assert_eq!(flags.discovery.host_for("10.0.0.7".parse().unwrap()).unwrap(), "10.0.0.7");
        let flags =
            Flags::try_parse_from(["w", "--etcd", "http://e:2379,http://f:2379", "--advertise-host", "fd00::1"])
                .unwrap();
        assert_eq!(flags.discovery.etcd, ["http://e:2379", "http://f:2379"]);
        assert_eq!(host_port(&flags.discovery.host_for("::".parse().unwrap()).unwrap(), 7001), "[fd00::1]:7001");
    }

    #[test]
    fn the_lease_ttl_is_at_least_a_second() {
        assert!(Flags::try_parse_from(["w", "--etcd-lease-ttl-secs", "0"]).is_err());
    }
}
