//! vLLM's `bad_words` as token sequences, shared by the router and the offline library so both
//! forbid the same tokens.

/// Each word (its leading whitespace trimmed) as it would start the text, and as it would follow
/// a space when that spelling is another sequence of as many tokens: vLLM's rule, so a word is
/// caught at the start of the text and in its middle. Empty words are the caller's to refuse.
pub fn bad_word_sequences<E>(
    words: &[String],
    mut encode: impl FnMut(&str) -> Result<Vec<u32>, E>,
) -> Result<Vec<Vec<u32>>, E> {
    let mut sequences = Vec::new();
    for word in words.iter().map(|w| w.trim_start()).filter(|w| !w.is_empty()) {
        let alone = encode(word)?;
        let spaced = encode(&format!(" {word}"))?;
        if spaced.len() == alone.len() && spaced.first() != alone.first() {
            sequences.push(spaced);
        }
        sequences.push(alone);
    }
    Ok(sequences)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per word, spaced or not, told apart by the space; "two words" is two tokens.
    fn encode(text: &str) -> Result<Vec<u32>, ()> {
        Ok(match text {
            "cat" => vec![1],
            " cat" => vec![2],
            "two words" => vec![3, 4],
            " two words" => vec![5, 6, 7],
            _ => return Err(()),
        })
    }

    #[test]
    fn a_word_is_forbidden_at_the_start_and_after_a_space_when_that_is_its_own_token() {
        assert_eq!(bad_word_sequences(&["  cat".into()], encode), Ok(vec![vec![2], vec![1]]));
        // The spaced spelling splits differently: only the word as written is forbidden.
        assert_eq!(bad_word_sequences(&["two words".into()], encode), Ok(vec![vec![3, 4]]));
        assert_eq!(bad_word_sequences(&["  ".into()], encode), Ok(vec![]));
        assert_eq!(bad_word_sequences(&["dog".into()], encode), Err(()));
    }
}
