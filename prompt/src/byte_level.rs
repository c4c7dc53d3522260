//! GPT-2's byte alphabet, which byte-level BPE vocabularies spell their
//! tokens in.

/// GPT-2's byte alphabet: printable bytes stand for themselves, the others
/// take the characters from U+0100 on, in byte order.
pub fn byte_chars() -> [char; 256] {
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for (b, c) in (0..=255u8).zip(chars.iter_mut()) {
        *c = if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or('\0')
        };
    }
    chars
}
