//! Who serves what: the served models by name, each model's card and worker
//! pools, the slots of each pool and their circuit breakers, and discovery
//! keeping them in step with etcd.

pub mod breaker;
pub mod discovery;
pub mod model;
pub mod pools;
pub mod roster;
pub mod served;
