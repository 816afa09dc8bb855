//! Encrypted-at-rest key values (`keyValueStorage: encrypted`): AES-256-GCM with the operator's key,
//! a fresh random nonce per value, the key id as associated data so a sealed value cannot be moved
//! to another key's record.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};

const NONCE_LEN: usize = 12;

/// Seals and opens key values with one 256-bit key.
#[derive(Clone)]
pub struct Sealer {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

/// Why a key could not be used or a value not opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The configured key is not 64 hex characters.
    #[error("the key encryption key must be 32 bytes written as 64 hex characters")]
    BadKey,
    /// The stored value does not decrypt with this key (wrong key, or tampered).
    #[error("a stored key value does not decrypt with the configured key")]
    Undecryptable,
}

impl Sealer {
    /// A sealer for a key given as 64 hex characters.
    pub fn from_hex(hex: &str) -> Result<Self, SealError> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(hex.trim(), &mut key).map_err(|_| SealError::BadKey)?;
        Ok(Self {
            cipher: Aes256Gcm::new(&Key::<Aes256Gcm>::from(key)),
        })
    }

    /// Encrypts `value` for the key `key_id`: nonce followed by ciphertext and tag.
    pub fn seal(&self, key_id: &str, value: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the operating system's random source failed");
        let sealed = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: key_id.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of a short value cannot fail");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts a value sealed for `key_id`.
    pub fn open(&self, key_id: &str, sealed: &[u8]) -> Result<String, SealError> {
        if sealed.len() < NONCE_LEN {
            return Err(SealError::Undecryptable);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SealError::Undecryptable)?;
        let plain = self
            .cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: body,
                    aad: key_id.as_bytes(),
                },
            )
            .map_err(|_| SealError::Undecryptable)?;
        String::from_utf8(plain).map_err(|_| SealError::Undecryptable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn seal_open_roundtrip_and_binding() {
        let s = Sealer::from_hex(KEY).unwrap();
        let sealed = s.seal("key0000001", "secretValue0123456789");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            s.open("key0000001", &sealed).unwrap(),
            "secretValue0123456789"
        );
        assert_eq!(s.open("key0000002", &sealed), Err(SealError::Undecryptable));
        let other = Sealer::from_hex(&KEY.replace("00", "ff")).unwrap();
        assert_eq!(
            other.open("key0000001", &sealed),
            Err(SealError::Undecryptable)
        );
        assert_ne!(s.seal("k", "v"), s.seal("k", "v"), "fresh nonce each time");
        assert_eq!(Sealer::from_hex("abc").unwrap_err(), SealError::BadKey);
        assert_eq!(
            Sealer::from_hex(&"zz".repeat(32)).unwrap_err(),
            SealError::BadKey
        );
    }
}
