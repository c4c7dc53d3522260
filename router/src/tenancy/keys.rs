//! The keys file: tenants, their API keys (kept as SHA-256 digests only),
//! what each may use and how much.
//!
//! ```toml
//! [tenants.acme]
//! models = ["SmolLM2-135M-Instruct"]   # absent: every served model
//! cache_salt = "acme"                  # absent: the tenant's own namespace
//! requests_per_minute = 600            # each limit applies to each key alone
//! tokens_per_minute = 200000
//! max_concurrent_requests = 16
//! max_prompt_tokens = 4096
//!
//! [[keys]]
//! id = "acme-prod"                     # named in metrics and the usage log
//! tenant = "acme"
//! sha256 = "<hex of SHA-256 of the key>" # printf %s "$KEY" | sha256sum
//! requests_per_minute = 60             # overrides the tenant's, for this key
//! ```

use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::limits::{KeyLimiter, Limits};

/// Why the keys file cannot be used. The router refuses to start on any of
/// them: a half-read keys file would open or close the wrong doors.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The file could not be read.
    #[error("cannot read the keys file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML of the expected shape.
    #[error("the keys file{} is invalid: {message}", named(path))]
    Parse { path: PathBuf, message: String },
    /// A key names a tenant the file does not define.
    #[error("key `{key}` names tenant `{tenant}`, which is not defined under [tenants]")]
    UnknownTenant { key: String, tenant: String },
    /// A key's digest is not 64 hex digits.
    #[error("key `{key}`: sha256 must be 64 hex digits (printf %s \"$KEY\" | sha256sum)")]
    BadDigest { key: String },
    /// Two entries share an id or a digest.
    #[error("key `{key}` is defined twice (same id or same sha256)")]
    Duplicate { key: String },
    /// A file with no key would lock every client out.
    #[error("the keys file{} defines no [[keys]]", named(path))]
    Empty { path: PathBuf },
}

/// ` PATH`, or nothing for keys that came from elsewhere than a file (etcd).
fn named(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        String::new()
    } else {
        format!(" {}", path.display())
    }
}

/// A tenant: the owner of one or more keys.
#[derive(Debug)]
pub struct Tenant {
    /// Its name, as in the keys file.
    pub name: String,
    /// The models its keys may use; `None`: every served model.
    pub models: Option<BTreeSet<String>>,
    /// The prefix-cache namespace of all its requests.
    namespace: String,
    /// Whether the namespace is all there is: the client's own salt is ignored.
    forced: bool,
}

impl Tenant {
    /// Whether the tenant may use the model served as `name`.
    pub fn may_use(&self, name: &str) -> bool {
        self.models.as_ref().is_none_or(|models| models.contains(name))
    }

    /// The cache salt a request of this tenant runs under. Every tenant has
    /// its own namespace, so no two tenants share cached prefixes, and the
    /// client's salt only divides its own tenant's namespace further: no
    /// salt a client sends can name another tenant's.
    pub fn salt(&self, requested: Option<String>) -> String {
        match requested {
            Some(salt) if !self.forced => format!("{}/{salt}", self.namespace),
            _ => self.namespace.clone(),
        }
    }
}

/// One API key: who holds it and its own limiter.
#[derive(Debug)]
pub struct ApiKey {
    /// Its public id, as in the keys file; never the secret.
    pub id: String,
    /// The tenant it belongs to.
    pub tenant: Arc<Tenant>,
    /// Its rate and concurrency limits, counted for this key alone; kept
    /// across reloads of the keys while its limits stay the same.
    pub limiter: Arc<KeyLimiter>,
}

/// Every configured key, by the SHA-256 digest of its secret.
#[derive(Debug, Default)]
pub struct KeyRing {
    by_digest: HashMap<[u8; 32], Arc<ApiKey>>,
    /// No keys are configured at all, as opposed to none loaded yet.
    open: bool,
}

impl KeyRing {
    /// No keys: the API is open, as vLLM's is without `--api-key`.
    pub fn open() -> Self {
        Self { by_digest: HashMap::new(), open: true }
    }

    /// Keys are required but none is known (yet): every request is refused.
    pub fn closed() -> Self {
        Self::default()
    }

    /// Whether requests need no key.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether there is no key.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Reads and checks the keys file at `path`.
    pub fn load(path: &Path) -> Result<Self, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read { path: path.to_owned(), source })?;
        let ring = Self::parse(&text).map_err(|e| match e {
            KeysError::Parse { message, .. } => KeysError::Parse { path: path.to_owned(), message },
            KeysError::Empty { .. } => KeysError::Empty { path: path.to_owned() },
            other => other,
        })?;
        Ok(ring)
    }

    /// The keys file's contents, checked.
    pub fn parse(text: &str) -> Result<Self, KeysError> {
        Self::parse_after(text, &Self::closed())
    }

    /// The keys file's contents, checked, replacing `previous`: a key whose
    /// id, digest and limits are unchanged keeps its limiter, so a reload
    /// neither refills its buckets nor forgets its running requests.
    pub fn parse_after(text: &str, previous: &KeyRing) -> Result<Self, KeysError> {
        let file: KeysFile = toml::from_str(text).map_err(|e| {
            // toml's own rendering spans lines; the CLI says it in one.
            let line = e.span().map_or(1, |span| text[..span.start].matches('\n').count() + 1);
            KeysError::Parse { path: PathBuf::new(), message: format!("line {line}: {}", e.message().trim()) }
        })?;
        if file.keys.is_empty() {
            return Err(KeysError::Empty { path: PathBuf::new() });
        }
        let tenants: HashMap<String, (Arc<Tenant>, Limits)> = file
            .tenants
            .into_iter()
            .map(|(name, t)| {
                let limits = t.limits();
                let tenant = Tenant {
                    namespace: match &t.cache_salt {
                        Some(salt) => format!("salt:{salt}"),
                        None => format!("tenant:{name}"),
                    },
                    forced: t.cache_salt.is_some(),
                    models: t.models.map(|m| m.into_iter().collect()),
                    name: name.clone(),
                };
                (name, (Arc::new(tenant), limits))
            })
            .collect();
        let mut ring = Self::closed();
        let mut ids = BTreeSet::new();
        for key in file.keys {
            let (tenant, limits) = tenants
                .get(&key.tenant)
                .ok_or_else(|| KeysError::UnknownTenant { key: key.id.clone(), tenant: key.tenant.clone() })?;
            let digest = parse_digest(&key.sha256).ok_or_else(|| KeysError::BadDigest { key: key.id.clone() })?;
            if !ids.insert(key.id.clone()) || ring.by_digest.contains_key(&digest) {
                return Err(KeysError::Duplicate { key: key.id });
            }
            let limits = key.limits().or(limits);
            let limiter = match previous.by_digest.get(&digest) {
                Some(old) if old.id == key.id && *old.limiter.limits() == limits => old.limiter.clone(),
                _ => Arc::new(KeyLimiter::new(limits)),
            };
            let entry = ApiKey { id: key.id, tenant: tenant.clone(), limiter };
            ring.by_digest.insert(digest, Arc::new(entry));
        }
        Ok(ring)
    }

    /// The key whose secret is `secret`, if configured.
    pub fn find(&self, secret: &str) -> Option<Arc<ApiKey>> {
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        self.by_digest.get(&digest).cloned()
    }
}

/// The hex SHA-256 digest of a key, as the keys file holds it.
pub fn digest_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut digest).ok()?;
    Some(digest)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    tenants: HashMap<String, TenantEntry>,
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

/// A keys-file entry: its own fields plus the four limits, each with a
/// `limits()` gathering them. serde cannot deny unknown fields through
/// `flatten`, and a misspelt limit must be an error, so the limits are
/// spelled out in each entry, by this one definition.
macro_rules! entry_with_limits {
    ($name:ident { $($field:ident: $ty:ty),* $(,)? }) => {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $name {
            $($field: $ty,)*
            requests_per_minute: Option<NonZeroU32>,
            tokens_per_minute: Option<NonZeroU32>,
            max_concurrent_requests: Option<NonZeroU32>,
            max_prompt_tokens: Option<NonZeroU32>,
        }

        impl $name {
            fn limits(&self) -> Limits {
                Limits {
                    requests_per_minute: self.requests_per_minute,
                    tokens_per_minute: self.tokens_per_minute,
                    max_concurrent_requests: self.max_concurrent_requests,
                    max_prompt_tokens: self.max_prompt_tokens,
                }
            }
        }
    };
}

entry_with_limits!(TenantEntry { models: Option<Vec<String>>, cache_salt: Option<String> });
entry_with_limits!(KeyEntry { id: String, tenant: String, sha256: String });

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(extra_tenant: &str, extra_key: &str) -> Result<KeyRing, KeysError> {
        KeyRing::parse(&format!(
            r#"
            [tenants.acme]
            models = ["m1"]
            requests_per_minute = 10
            {extra_tenant}
            [tenants.globex]
            cache_salt = "shared"

            [[keys]]
            id = "acme-1"
            tenant = "acme"
            sha256 = "{}"
            {extra_key}
            [[keys]]
            id = "globex-1"
            tenant = "globex"
            sha256 = "{}"
            "#,
            digest_hex("sk-acme"),
            digest_hex("sk-globex")
        ))
    }

    #[test]
    fn keys_are_found_by_their_secret_only() {
        let ring = ring("", "").unwrap();
        assert_eq!(ring.find("sk-acme").unwrap().id, "acme-1");
        assert_eq!(ring.find("sk-globex").unwrap().tenant.name, "globex");
        assert!(ring.find("sk-other").is_none());
        assert!(ring.find(&digest_hex("sk-acme")).is_none(), "the digest is not a key");
        assert!(!ring.is_open());
        assert!(KeyRing::open().is_open());
    }

    #[test]
    fn models_are_allowed_per_tenant() {
        let ring = ring("", "").unwrap();
        let acme = ring.find("sk-acme").unwrap();
        assert!(acme.tenant.may_use("m1"));
        assert!(!acme.tenant.may_use("m2"));
        assert!(ring.find("sk-globex").unwrap().tenant.may_use("anything"));
    }

    #[test]
    fn tenants_never_share_a_cache_namespace() {
        let ring = ring("", "").unwrap();
        let acme = &ring.find("sk-acme").unwrap().tenant;
        let globex = &ring.find("sk-globex").unwrap().tenant;
        assert_eq!(acme.salt(None), "tenant:acme");
        assert_eq!(acme.salt(Some("x".into())), "tenant:acme/x");
        // A forced salt ignores the client's, so a client cannot leave it.
        assert_eq!(globex.salt(Some("tenant:acme".into())), "salt:shared");
        // Whatever acme sends stays under acme's namespace.
        for forged in ["shared", "salt:shared", "../globex", "", "tenant:globex"] {
            let salt = acme.salt(Some(forged.into()));
            assert!(salt.starts_with("tenant:acme/"), "{salt}");
            assert_ne!(salt, globex.salt(None));
        }
    }

    #[test]
    fn a_bad_file_is_refused_with_the_reason() {
        let unknown = KeyRing::parse(
            r#"[[keys]]
            id = "k"
            tenant = "nobody"
            sha256 = "00""#,
        );
        assert!(matches!(unknown, Err(KeysError::UnknownTenant { .. })), "{unknown:?}");
        let short = ring("", "")
            .map(|_| ())
            .and_then(|()| KeyRing::parse("[tenants.t]\n[[keys]]\nid = \"k\"\ntenant = \"t\"\nsha256 = \"abc\""));
        assert!(matches!(short, Err(KeysError::BadDigest { .. })), "{short:?}");
        let typo = ring("request_per_minute = 5", "");
        assert!(matches!(typo, Err(KeysError::Parse { .. })), "{typo:?}");
        assert!(matches!(KeyRing::parse("[tenants.t]"), Err(KeysError::Empty { .. })));
        let twice = KeyRing::parse(&format!(
            "[tenants.t]\n[[keys]]\nid = \"a\"\ntenant = \"t\"\nsha256 = \"{0}\"\n[[keys]]\nid = \"b\"\ntenant = \"t\"\nsha256 = \"{0}\"",
            digest_hex("same")
        ));
        assert!(matches!(twice, Err(KeysError::Duplicate { .. })), "{twice:?}");
    }

    #[test]
    fn a_key_overrides_its_tenants_limits() {
        let ring = ring("", "requests_per_minute = 2").unwrap();
        let acme = ring.find("sk-acme").unwrap();
        assert!(acme.limiter.check_request().is_ok());
        assert!(acme.limiter.check_request().is_ok());
        assert!(acme.limiter.check_request().is_err(), "the key's 2/min, not the tenant's 10/min");
    }
}

#[cfg(test)]
mod reload_tests {
    use super::*;

    fn file(rpm: u32, keys: &[&str]) -> String {
        let mut text = format!("[tenants.t]\nrequests_per_minute = {rpm}\n");
        for k in keys {
            text.push_str(&format!("[[keys]]\nid = \"{k}\"\ntenant = \"t\"\nsha256 = \"{}\"\n", digest_hex(k)));
        }
        text
    }

    #[test]
    fn a_reload_keeps_the_buckets_of_unchanged_keys_only() {
        let first = KeyRing::parse(&file(1, &["a", "b"])).unwrap();
        first.find("a").unwrap().limiter.check_request().unwrap();
        first.find("b").unwrap().limiter.check_request().unwrap();
        let same = KeyRing::parse_after(&file(1, &["a", "c"]), &first).unwrap();
        assert!(same.find("a").unwrap().limiter.check_request().is_err(), "a's minute is still spent");
        assert!(same.find("b").is_none(), "b was removed");
        assert!(same.find("c").unwrap().limiter.check_request().is_ok());
        let raised = KeyRing::parse_after(&file(5, &["a"]), &same).unwrap();
        assert!(raised.find("a").unwrap().limiter.check_request().is_ok(), "new limits, new buckets");
    }

    #[test]
    fn open_and_closed_rings_differ() {
        assert!(KeyRing::open().is_open());
        let closed = KeyRing::closed();
        assert!(!closed.is_open() && closed.is_empty());
        assert!(closed.find("anything").is_none());
    }
}
