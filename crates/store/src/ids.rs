//! Identifiers and generated key values, shaped like AWS's.

const LOWER_ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// `len` characters drawn uniformly from `alphabet` with the OS's CSPRNG.
fn random_string(alphabet: &[u8], len: usize) -> String {
    // Rejection sampling keeps the draw uniform: bytes at or above the largest multiple of the
    // alphabet size are discarded.
    let n = alphabet.len();
    let cutoff = 256 - 256 % n;
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        // The OS random source failing is unrecoverable for a security component.
        getrandom::fill(&mut buf).expect("the operating system's random source failed");
        for &b in &buf {
            if usize::from(b) < cutoff && out.len() < len {
                out.push(char::from(alphabet[usize::from(b) % n]));
            }
        }
    }
    out
}

/// A new API key id: 10 lowercase alphanumerics, like AWS's `58v93i1885`.
pub fn new_key_id() -> String {
    random_string(LOWER_ALNUM, 10)
}

/// A new usage plan id: 6 lowercase alphanumerics, like AWS's `cqdia0`.
pub fn new_plan_id() -> String {
    random_string(LOWER_ALNUM, 6)
}

/// A new API key value: 40 alphanumerics, as AWS generates.
pub fn new_key_value() -> String {
    random_string(ALNUM, 40)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let id = new_key_id();
        assert_eq!(id.len(), 10);
        assert!(id.bytes().all(|b| LOWER_ALNUM.contains(&b)));
        assert_eq!(new_plan_id().len(), 6);
        let v = new_key_value();
        assert_eq!(v.len(), 40);
        assert!(v.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(new_key_value(), v);
    }
}
