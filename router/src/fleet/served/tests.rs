use std::sync::Arc;

use super::*;
use crate::backend::{GenerateRequest, TokenStream};
use crate::testutil::card;

/// A backend that is never called: resolving a model runs nothing.
struct NoBackend;

impl Backend for NoBackend {
    fn generate(&self, _: GenerateRequest) -> TokenStream {
        unreachable!("no generation in these tests")
    }
}

fn served(name: &str) -> ServedModel {
    let card = proto::worker::ModelCard { model_name: name.into(), ..card() };
    ServedModel::ready(Model::from_card(&card, None).unwrap(), Arc::new(NoBackend))
}

#[tokio::test]
async fn unknown_model_is_not_found() {
    let models = ServedModels::new(vec![served("tiny")]);
    assert_eq!(models.resolve(Some("other")).await.unwrap_err(), Unservable::NotFound("other".into()));
    assert_eq!(models.resolve(Some("tiny")).await.unwrap().name(), Some("tiny"));
    assert_eq!(models.resolve(None).await.unwrap().name(), Some("tiny"));
}

#[tokio::test]
async fn a_request_naming_no_model_among_several_is_refused() {
    let models = ServedModels::new(vec![served("a"), served("b")]);
    assert_eq!(models.resolve(None).await.unwrap_err(), Unservable::Unnamed);
    assert_eq!(models.resolve(Some("b")).await.unwrap().name(), Some("b"));
}
