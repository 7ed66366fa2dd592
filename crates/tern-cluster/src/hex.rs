//! Hex for the names and values NATS restricts (KV keys, header values).

/// `bytes` in lower-case hex.
pub(crate) fn encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes `hex` stands for, if it is hex.
pub(crate) fn decode(hex: &str) -> Option<Vec<u8>> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The text `hex` stands for, if it is hex of UTF-8.
pub(crate) fn text(hex: &str) -> Option<String> {
    String::from_utf8(decode(hex)?).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips() {
        assert_eq!(super::encode("a/é".as_bytes()), "612fc3a9");
        assert_eq!(super::text("612fc3a9").as_deref(), Some("a/é"));
        assert_eq!(super::decode("6"), None);
        assert_eq!(super::decode("zz"), None);
    }
}
