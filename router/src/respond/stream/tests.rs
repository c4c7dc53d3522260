use futures::stream::{self, StreamExt};

use super::*;
use crate::backend::{TokenChunk, TokenLogprobs};
use crate::testutil::{decoder, ids, EOS};

fn push_all(output: &mut Output, ids: &[u32]) -> Vec<Delta> {
    ids.iter().filter_map(|&id| output.push(id, None)).collect()
}

fn texts(deltas: &[Delta]) -> Vec<&str> {
    deltas.iter().map(|d| d.text.as_str()).collect()
}

#[test]
fn detokenizer_never_splits_a_multibyte_char() {
    let mut detok = Detokenizer::new(decoder());
    // "é" is 0xC3 0xA9: two tokens, one character.
    let out: Vec<String> = ids("aé b").into_iter().map(|id| detok.push(id)).collect();
    assert_eq!(out, ["a", "", "é", " ", "b"]);
}

#[test]
fn detokenizer_flushes_an_incomplete_char_at_the_end() {
    let mut detok = Detokenizer::new(decoder());
    assert_eq!(detok.push(0xE2), "");
    assert_eq!(detok.flush(), "\u{FFFD}");
}

#[test]
fn special_tokens_produce_no_text() {
    let mut output = Output::new(decoder(), vec![], 10);
    assert_eq!(push_all(&mut output, &ids("hi")).len(), 2);
    let last = output.push(EOS, Some(Finish::Stop)).unwrap();
    assert_eq!(last.text, "");
    assert_eq!(last.token_ids, [EOS]);
    assert_eq!(last.finish, Some(Finish::Stop));
    assert_eq!(output.completion_tokens(), 3);
}

#[test]
fn stop_matcher_holds_back_a_possible_stop_prefix() {
    let m = StopMatcher::new(vec!["END".into()]);
    assert_eq!(m.check("abcE", 3), StopCheck::SafeUpTo(3));
    assert_eq!(m.check("abcEN", 4), StopCheck::SafeUpTo(3));
    assert_eq!(m.check("abcENX", 5), StopCheck::SafeUpTo(6));
    assert_eq!(m.check("abcEND", 5), StopCheck::StopAt(3));
}

#[test]
fn stop_string_cuts_text_and_holds_back_while_streaming() {
    let mut output = Output::new(decoder(), vec!["\n\n".into()], 100);
    let deltas = push_all(&mut output, &ids("ab\ncd\n\nef"));
    assert_eq!(texts(&deltas), ["a", "b", "\nc", "d", ""]);
    let last = deltas.last().unwrap();
    assert_eq!(last.finish, Some(Finish::Stop));
    // Tokens up to and including the one that completed the stop count.
    assert_eq!(output.completion_tokens(), 7);
    assert!(output.push(b'x'.into(), None).is_none());
}

#[test]
fn held_back_text_is_flushed_when_the_worker_finishes() {
    let mut output = Output::new(decoder(), vec!["xyz".into()], 100);
    let mut deltas = push_all(&mut output, &ids("ax"));
    deltas.push(output.end(Finish::Length));
    assert_eq!(texts(&deltas), ["a", "x"]);
    assert_eq!(deltas[1].finish, Some(Finish::Length));
}

#[test]
fn max_tokens_finishes_with_length() {
    let mut output = Output::new(decoder(), vec![], 2);
    let deltas = push_all(&mut output, &ids("abc"));
    assert_eq!(texts(&deltas), ["a", "b"]);
    assert_eq!(deltas[1].finish, Some(Finish::Length));
}

#[tokio::test]
async fn deltas_stop_pulling_after_a_stop_string() {
    let chunks = vec![
        Ok(TokenChunk { token_ids: ids("hi!"), ..TokenChunk::default() }),
        Ok(TokenChunk { token_ids: ids("more"), ..TokenChunk::default() }),
        Err(BackendError::Aborted),
    ];
    let output = Output::new(decoder(), vec!["!".into()], 100);
    let all: Vec<_> = deltas(stream::iter(chunks).boxed(), vec![output]).collect().await;
    let all: Vec<Delta> = all.into_iter().map(Result::unwrap).collect();
    assert_eq!(texts(&all), ["h", "i", ""]);
    assert_eq!(all[2].finish, Some(Finish::Stop));
}

/// Logprobs whose value is the token id, to tell them apart.
fn lp(id: u32) -> Option<TokenLogprobs> {
    Some(TokenLogprobs { logprob: -(id as f32), top: vec![(id, -(id as f32))], rank: 1 })
}

fn reported(deltas: &[Delta]) -> Vec<String> {
    deltas.iter().flat_map(|d| d.logprobs.iter().map(|l| l.token.clone())).collect()
}

#[test]
fn logprobs_go_out_with_their_text_and_stop_strings_cut_them() {
    let mut output = Output::new(decoder(), vec!["cd".into()], 100);
    let mut deltas = Vec::new();
    for id in ids("abcde") {
        deltas.extend(output.push_with_logprobs(id, lp(id), None));
    }
    // "c" is held back (it may start "cd"), then "d" completes the stop.
    assert_eq!(texts(&deltas), ["a", "b", ""]);
    assert_eq!(deltas.iter().map(|d| d.logprobs.len()).collect::<Vec<_>>(), [1, 1, 0]);
    assert_eq!(reported(&deltas), ["a", "b"]);
    let a = &deltas[0].logprobs[0];
    assert_eq!((a.logprob, a.bytes.clone()), (-97.0, vec![b'a']));
    assert_eq!(a.top_logprobs[0].token, "a");
    assert_eq!(a.top_logprobs[0].logprob, -97.0);
}

#[test]
fn a_split_character_and_eos_report_every_token() {
    let mut output = Output::new(decoder(), vec![], 100);
    let mut deltas = Vec::new();
    for id in ids("é") {
        deltas.extend(output.push_with_logprobs(id, lp(id), None));
    }
    deltas.extend(output.push_with_logprobs(EOS, lp(EOS), Some(Finish::Stop)));
    assert_eq!(texts(&deltas), ["é", ""]);
    // Both bytes of "é" go with its text; eos (no text) with the finish.
    assert_eq!(deltas[0].logprobs.len(), 2);
    assert_eq!(deltas[1].logprobs.len(), 1);
    assert_eq!(deltas[1].logprobs[0].token, "<eos>");
    assert_eq!(deltas[1].logprobs[0].logprob, -256.0);
}

#[test]
fn minus_infinity_is_sent_as_the_floor() {
    let mut output = Output::new(decoder(), vec![], 100);
    let inf = TokenLogprobs { logprob: f32::NEG_INFINITY, top: vec![], rank: 1 };
    let delta = output.push_with_logprobs(b'a'.into(), Some(inf), None).unwrap();
    assert_eq!(delta.logprobs[0].logprob, -9999.0);
}
