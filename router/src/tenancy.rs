//! API keys and tenants: who is calling, what they may use, how much, and
//! what they used.
//!
//! - [`keys`]: the keys file -> [`keys::KeyRing`], SHA-256 digest -> key -> tenant.
//! - [`limits`]: each key's rate buckets, concurrency cap and prompt cap.
//! - [`usage`]: each request's usage, counted from the tokens it was sent
//!   (a cancelled stream too), as metrics and a JSON-lines usage log.
//! - [`Caller`]: who sent a request (`crate::http::auth` extracts it, 401 without a valid key).
//! - [`Keys`]: the ring in use, replaced whole when the keys change ([`etcd`]).

pub mod etcd;
pub mod keys;
pub mod limits;
pub mod usage;

use std::sync::{Arc, PoisonError, RwLock};

use keys::{ApiKey, KeyRing};
use limits::{LimitError, Running};

/// The key ring in use. Requests read it once each; a reload swaps it
/// whole, so a request never sees half of one file and half of another.
#[derive(Debug)]
pub struct Keys {
    ring: RwLock<Arc<KeyRing>>,
}

impl Keys {
    /// Starts with `ring`.
    pub fn new(ring: KeyRing) -> Self {
        Self { ring: RwLock::new(Arc::new(ring)) }
    }

    /// The ring now.
    pub fn current(&self) -> Arc<KeyRing> {
        // Replaced whole under the lock: a poisoned one still holds a ring.
        self.ring.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Puts `ring` in use for every request from now on.
    pub fn replace(&self, ring: KeyRing) {
        *self.ring.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(ring);
    }
}

/// Why a request was not let in (401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("You didn't provide an API key. Provide it in an Authorization header: `Authorization: Bearer <key>`.")]
    Missing,
    /// A key that is not configured.
    #[error("Incorrect API key provided.")]
    Invalid,
}

/// The caller's tenant may not use the model it named (403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("This API key may not use the model `{0}`.")]
pub struct ModelNotAllowed(pub String);

/// Who sent a request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No keys are configured: the API is open and nothing is limited.
    Anonymous,
    /// A configured key.
    Key(Arc<ApiKey>),
}

/// The `tenant` and `key` labels of requests without a key.
const ANONYMOUS: &str = "anonymous";

impl Caller {
    /// Whether the caller may use the model served as `name`.
    pub fn may_use(&self, name: &str) -> bool {
        match self {
            Self::Anonymous => true,
            Self::Key(key) => key.tenant.may_use(name),
        }
    }

    /// `Ok` when the caller may use the model served as `name`.
    pub fn authorize(&self, name: &str) -> Result<(), ModelNotAllowed> {
        if self.may_use(name) {
            Ok(())
        } else {
            Err(ModelNotAllowed(name.to_owned()))
        }
    }

    /// The cache salt the caller's request runs under: the client's own
    /// without keys (vLLM's `cache_salt`), else inside its tenant's namespace.
    pub fn cache_salt(&self, requested: Option<String>) -> Option<String> {
        match self {
            Self::Anonymous => requested,
            Self::Key(key) => Some(key.tenant.salt(requested)),
        }
    }

    /// Counts a request against the key's requests per minute.
    pub fn check_request(&self) -> Result<(), LimitError> {
        match self {
            Self::Anonymous => Ok(()),
            Self::Key(key) => key.limiter.check_request(),
        }
    }

    /// Admits a request of `prompt_tokens` that may generate `max_new_tokens`
    /// under the key's token, prompt and concurrency limits.
    pub fn admit(&self, prompt_tokens: usize, max_new_tokens: u64) -> Result<Running, LimitError> {
        match self {
            Self::Anonymous => Ok(Running::unlimited()),
            Self::Key(key) => key.limiter.admit(prompt_tokens, max_new_tokens),
        }
    }

    /// The caller's tenant name, `anonymous` without keys.
    pub fn tenant(&self) -> &str {
        match self {
            Self::Anonymous => ANONYMOUS,
            Self::Key(key) => &key.tenant.name,
        }
    }

    /// The caller's key id, `anonymous` without keys.
    pub fn key_id(&self) -> &str {
        match self {
            Self::Anonymous => ANONYMOUS,
            Self::Key(key) => &key.id,
        }
    }
}
