//! `prompt::encode::Encoder` gives exactly `Tokenizer::encode`'s ids, and
//! `prompt::decode::Decoder` exactly `Tokenizer::decode`'s text, on the
//! default model's tokenizer, as the router receives it in the model card:
//! over the Unicode code points in several contexts, random text from a fixed
//! seed, and the golden prompts.

mod common;

use std::str::FromStr;
use std::sync::Arc;

use prompt::decode::Decoder;
use prompt::encode::Encoder;
use tokenizers::Tokenizer;

/// The default model's tokenizer, through JSON as the model card carries it.
fn tokenizer() -> Arc<Tokenizer> {
    let mut file = std::fs::File::open(common::model_path()).expect("model file");
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).expect("GGUF");
    let built = engine::tokenizer::from_gguf(&content).expect("tokenizer");
    Arc::new(Tokenizer::from_str(&built.to_string(false).unwrap()).unwrap())
}

fn assert_same(tokenizer: &Tokenizer, encoder: &Encoder, text: &str) {
    let want = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    let got = encoder.encode(text).unwrap();
    if got != want {
        // Narrow it down to the first piece of text that differs, for the message.
        let first = (0..text.len())
            .filter(|&i| text.is_char_boundary(i))
            .find(|&i| tokenizer.encode(&text[..i], false).unwrap().get_ids() != encoder.encode(&text[..i]).unwrap())
            .unwrap_or(text.len());
        panic!("ids differ; shortest differing prefix ends near byte {first}: {:?}", &text[..first]);
    }
}

#[test]
fn the_default_tokenizer_takes_the_fast_path() {
    assert!(Encoder::new(tokenizer()).is_fast(), "SmolLM2's byte-level BPE should be encoded on the fast path");
}

#[test]
fn every_code_point_encodes_as_the_tokenizer_encodes_it() {
    let tokenizer = tokenizer();
    let encoder = Encoder::new(tokenizer.clone());
    // Planes 0-2 and 14 whole (every assigned character but private use);
    // the unassigned and private-use planes sampled.
    let wanted = |code: u32| code < 0x30000 || (0xE0000..0xF0000).contains(&code) || code.is_multiple_of(97);
    let chars: Vec<char> = (0..=0x10FFFFu32).filter(|&c| wanted(c)).filter_map(char::from_u32).collect();
    // Each character doubled between letters, after a space before a digit,
    // and after a whitespace run: every branch of GPT-2's pattern.
    for chunk in chars.chunks(512) {
        let mut text = String::new();
        for &c in chunk {
            for context in ["a{}{}b", " {}1", "  {}\n", "'{}'s\u{3000}"] {
                text.push_str(&context.replace("{}", &c.to_string()));
            }
        }
        assert_same(&tokenizer, &encoder, &text);
    }
}

#[test]
fn random_text_encodes_as_the_tokenizer_encodes_it() {
    let tokenizer = tokenizer();
    let encoder = Encoder::new(tokenizer.clone());
    let pool = [
        "a",
        "Z",
        "hello",
        " world",
        "0",
        "7",
        "42",
        " ",
        "  ",
        "\t",
        "\n",
        "\r\n",
        "'s",
        "'t",
        "'re",
        "'ll",
        "'d",
        "'m",
        "'ve",
        "'S",
        "!",
        "?",
        ".",
        ",",
        "--",
        "\u{a0}",
        "\u{2009}",
        "\u{3000}",
        "\u{85}",
        "é",
        "e\u{301}",
        "中文",
        "🙂",
        "👍🏽",
        "٣",
        "²",
        "½",
        "Ⅻ",
        "ß",
        "İ",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_",
        "|>",
        "<",
        "\u{0}",
        "\u{feff}",
        "\u{200b}",
        "ﬁ",
        "Ａ",
        "κόσμε",
    ];
    // A fixed seed: the same texts on every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..5_000 {
        let len = next() % 24;
        let text: String = (0..len).map(|_| pool[(next() % pool.len() as u64) as usize]).collect();
        assert_same(&tokenizer, &encoder, &text);
    }
}

#[test]
fn the_golden_prompts_encode_to_their_ids() {
    let tokenizer = tokenizer();
    let encoder = Encoder::new(tokenizer.clone());
    for record in common::golden() {
        let text = tokenizer.decode(&record.prompt, false).unwrap();
        assert_same(&tokenizer, &encoder, &text);
        assert_eq!(encoder.encode(&text).unwrap(), record.prompt, "{}", record.id);
    }
}

#[test]
fn decoding_gives_the_tokenizers_text() {
    let tokenizer = tokenizer();
    let decoder = Decoder::new(tokenizer.clone());
    assert!(decoder.is_fast(), "SmolLM2's byte-level vocabulary should decode from the table");
    let vocab = tokenizer.get_vocab_size(true) as u32;
    let same = |ids: &[u32]| {
        for skip in [false, true] {
            assert_eq!(decoder.decode(ids, skip).unwrap(), tokenizer.decode(ids, skip).unwrap(), "{ids:?} {skip}");
        }
    };
    // Every id alone (half characters come out as U+FFFD), and one past the vocabulary.
    for id in 0..=vocab {
        same(&[id]);
    }
    // Random runs from a fixed seed: characters split over tokens, specials among them.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let len = next() % 8;
        let ids: Vec<u32> = (0..len).map(|_| (next() % u64::from(vocab)) as u32).collect();
        same(&ids);
    }
    for record in common::golden() {
        same(&record.prompt);
        same(&record.completion);
    }
}
