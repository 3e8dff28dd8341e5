//! Test vectors: hex written whitespace-tolerant with `#` comments for byte groups (as iroh's
//! `check_expected_bytes`), shared by the codec tests.
#![cfg(test)]

/// Whitespace-tolerant hex with `#` comments.
pub(crate) fn hex(s: &str) -> Vec<u8> {
    let digits: String = s
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .collect::<String>()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
        .collect()
}
