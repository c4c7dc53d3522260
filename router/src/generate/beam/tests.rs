use std::sync::Mutex;

use futures::stream;

use super::*;
use crate::backend::TokenLogprobs;

const EOS: u32 = 9;

/// Next-token logprobs that depend on the last token only, and the requests it was asked.
#[derive(Default)]
struct Table {
    asked: Mutex<Vec<GenerateRequest>>,
}

impl Table {
    fn next(last: u32) -> Vec<(u32, f32)> {
        match last {
            0 => vec![(1, -0.5), (2, -0.9)],
            1 => vec![(3, -2.0), (4, -2.1)],
            2 => vec![(5, -0.1), (6, -3.0)],
            _ => vec![(EOS, -0.01), (7, -5.0)],
        }
    }
}

impl Backend for Table {
    fn generate(&self, request: GenerateRequest) -> TokenStream {
        let top = Self::next(*request.prompt_token_ids.last().unwrap());
        self.asked.lock().unwrap().push(request);
        let logprobs = TokenLogprobs { logprob: top[0].1, top: top.clone(), rank: 1 };
        let chunk = TokenChunk { token_ids: vec![top[0].0], logprobs: vec![logprobs], ..TokenChunk::default() };
        stream::iter([Ok(chunk)]).boxed()
    }
}

fn request(max_tokens: u32) -> GenerateRequest {
    let prompt = vec![0];
    GenerateRequest {
        request_id: "r".into(),
        demand: GenerateRequest::demand_for(&prompt, None, None),
        prompt_token_ids: Arc::new(prompt),
        sampling: Sampling { max_tokens, n: 2, ..Sampling::default() },
        priority: 0,
        cache_salt: None,
        first_worker: None,
    }
}

async fn beams(search: BeamSearch, request: GenerateRequest) -> (Vec<(Vec<u32>, Option<Finish>)>, usize) {
    let table = Arc::new(Table::default());
    let chunks: Vec<TokenChunk> =
        beam_search(table.clone(), request, search, vec![EOS]).map(|c| c.unwrap()).collect().await;
    let asked = table.asked.lock().unwrap().len();
    (chunks.into_iter().map(|c| (c.token_ids, c.finish)).collect(), asked)
}

#[tokio::test]
async fn the_best_beams_win_where_greedy_would_not() {
    let (found, asked) = beams(BeamSearch { width: 2, length_penalty: 0.0 }, request(3)).await;
    // Greedy takes 1 first (-0.5); the beam through 2 (-0.9) then 5 (-0.1) ends better.
    assert_eq!(found, [(vec![2, 5, EOS], Some(Finish::Stop)), (vec![1, 3, EOS], Some(Finish::Stop))]);
    // One ask for the prompt, then one per live beam per step.
    assert_eq!(asked, 1 + 2 + 2);
}

#[tokio::test]
async fn each_step_asks_one_token_and_twice_the_width_of_alternatives_after_the_beam() {
    let table = Arc::new(Table::default());
    let search = BeamSearch { width: 2, length_penalty: 1.0 };
    let _: Vec<_> = beam_search(table.clone(), request(2), search, vec![EOS]).collect().await;
    let asked = table.asked.lock().unwrap();
    let second = asked.iter().find(|r| r.prompt_token_ids.len() == 2).unwrap();
    assert_eq!((second.sampling.max_tokens, second.sampling.logprobs, second.sampling.n), (1, Some(4), 1));
    assert!(second.sampling.ignore_eos && second.sampling.temperature == 0.0);
    assert!(second.request_id.starts_with("r-beam1-"), "{}", second.request_id);
}

#[tokio::test]
async fn beams_cut_by_max_tokens_end_with_length_and_the_length_penalty_weighs_in() {
    let (found, _) = beams(BeamSearch { width: 2, length_penalty: 1.0 }, request(2)).await;
    // Two steps: no beam reaches eos; by mean logprob over 3 tokens [2, 5] leads.
    assert_eq!(found, [(vec![2, 5], Some(Finish::Length)), (vec![1, 3], Some(Finish::Length))]);
    // Stop token ids end a beam like eos.
    let mut stopping = request(2);
    stopping.sampling.stop_token_ids = vec![3];
    let (found, _) = beams(BeamSearch { width: 1, length_penalty: 1.0 }, stopping).await;
    assert_eq!(found, [(vec![1, 3], Some(Finish::Stop))]);
}
