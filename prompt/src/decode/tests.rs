use std::sync::Arc;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::{AddedToken, DecoderWrapper, Tokenizer};

use super::Decoder;

/// A SentencePiece vocabulary as Gemma's is built: `▁` for spaces, byte fallback, a control token.
fn sentencepiece() -> Tokenizer {
    let pieces = ["<unk>", "<0x0A>", "<0xC3>", "<0xA9>", "▁", "h", "i", "▁hi", "é"];
    let vocab: tokenizers::models::bpe::Vocab =
        pieces.iter().enumerate().map(|(i, p)| (p.to_string(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, vec![]).byte_fallback(true).unk_token("<unk>".into()).build();
    let mut tokenizer = Tokenizer::new(bpe.unwrap());
    let decoder: DecoderWrapper =
        Sequence::new(vec![Replace::new("▁", " ").unwrap().into(), ByteFallback::new().into(), Fuse::new().into()])
            .into();
    tokenizer.with_decoder(Some(decoder));
    tokenizer.add_special_tokens(&[AddedToken::from("<eos>", true)]);
    tokenizer
}

#[test]
fn sentencepiece_tokens_have_their_bytes() {
    let tokenizer = Arc::new(sentencepiece());
    let decoder = Decoder::new(tokenizer.clone());
    assert_eq!(decoder.table_len(), Some(10));
    assert_eq!(decoder.token_bytes(7), Some((&b" hi"[..], false)));
    assert_eq!(decoder.token_bytes(1), Some((&b"\n"[..], false)));
    assert_eq!(decoder.token_bytes(2), Some((&[0xC3][..], false)));
    assert_eq!(decoder.token_bytes(8), Some(("é".as_bytes(), false)));
    assert_eq!(decoder.token_bytes(9), Some((&b"<eos>"[..], true)));
    // The text still comes from the tokenizer, byte fallback and all.
    assert!(!decoder.is_fast());
    for ids in [&[7, 2, 3, 1, 4, 9][..], &[2, 5], &[3, 3, 8]] {
        assert_eq!(decoder.decode(ids, true).unwrap(), tokenizer.decode(ids, true).unwrap(), "{ids:?}");
        assert_eq!(decoder.decode(ids, false).unwrap(), tokenizer.decode(ids, false).unwrap(), "{ids:?}");
    }
}

#[test]
fn other_decoders_have_no_table() {
    let mut tokenizer = sentencepiece();
    let strip: DecoderWrapper = Sequence::new(vec![Replace::new("▁", " ").unwrap().into(), Fuse::new().into()]).into();
    tokenizer.with_decoder(Some(strip));
    assert_eq!(Decoder::new(Arc::new(tokenizer)).table_len(), None);
}
