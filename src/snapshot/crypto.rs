//! Encryption at rest of a snapshot store: chunks and indexes sealed with XChaCha20-Poly1305,
//! chunk names keyed, so that neither the objects nor their names reveal the content.
//!
//! From the store's 32-byte key `K`: the sealing key is `HMAC-SHA256(K, "diskkit-snapshot-seal")`;
//! a chunk whose content has SHA-256 `d` is stored as `HMAC-SHA256(HMAC-SHA256(K,
//! "diskkit-snapshot-name"), d)` instead of `d` (equal contents still share a chunk, but a name
//! cannot be checked against a guessed content without the key; the sealed indexes keep `d`,
//! which restore checks the content against); and the store's config records
//! `HMAC-SHA256(K, "diskkit-snapshot-key-check")` so that a wrong key is told apart from damage.
//! A sealed object is `DKSEALED` || 24-byte random nonce || ciphertext with its 16-byte tag; the
//! object's name (chunk name or snapshot id) is the associated data, so an object cannot be
//! passed off as another.

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload};
use diskkit_formats::digest::hex;
use diskkit_formats::{Error, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;

const SEALED_MAGIC: &[u8; 8] = b"DKSEALED";
const NONCE: usize = 24;
const TAG: usize = 16;
/// The environment variable that holds a store's key (64 hex digits).
pub const KEY_ENV: &str = "DISKKIT_SNAPSHOT_KEY";
/// The name of the cipher in the store's config.
pub const CIPHER: &str = "xchacha20poly1305";

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(key)
        .expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// A store key, with what is derived from it.
pub struct Crypto {
    cipher: XChaCha20Poly1305,
    name_key: [u8; 32],
    check: String,
}

impl Crypto {
    pub fn new(key: &[u8; 32]) -> Crypto {
        let seal = hmac(key, b"diskkit-snapshot-seal");
        Crypto {
            cipher: XChaCha20Poly1305::new(&seal.into()),
            name_key: hmac(key, b"diskkit-snapshot-name"),
            check: hex(&hmac(key, b"diskkit-snapshot-key-check")),
        }
    }

    /// The key of `--key-file FILE` (64 hex digits, or 32 raw bytes), else of the environment
    /// variable [`KEY_ENV`]; `None` when neither is given.
    pub fn from_user(key_file: Option<&Path>) -> Result<Option<Crypto>> {
        let text = match key_file {
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|e| Error::io(path, "read key", e))?;
                if bytes.len() == 32 {
                    let mut key = [0u8; 32];
                    key.copy_from_slice(&bytes);
                    return Ok(Some(Crypto::new(&key)));
                }
                String::from_utf8(bytes).map_err(|_| {
                    Error::invalid(format!(
                        "{}: a key file holds 64 hex digits or 32 bytes",
                        path.display()
                    ))
                })?
            }
            None => match std::env::var(KEY_ENV) {
                Ok(v) if !v.is_empty() => v,
                _ => return Ok(None),
            },
        };
        let text = text.trim();
        let mut key = [0u8; 32];
        if text.len() != 64 {
            return Err(Error::invalid(format!(
                "a store key is 64 hex digits (32 bytes), this one has {} characters",
                text.len()
            )));
        }
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                .map_err(|_| Error::invalid("a store key is 64 hex digits"))?;
        }
        Ok(Some(Crypto::new(&key)))
    }

    /// The value the store's config records to recognise this key.
    pub fn key_check(&self) -> &str {
        &self.check
    }

    /// The keyed object name of the chunk whose content has SHA-256 `digest`.
    pub fn chunk_name(&self, digest: &[u8; 32]) -> [u8; 32] {
        hmac(&self.name_key, digest)
    }

    /// `bytes` sealed under the object name `name`.
    pub fn seal(&self, name: &str, bytes: &[u8]) -> Result<Vec<u8>> {
        let nonce = chacha20poly1305::XNonce::generate();
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: bytes,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| Error::invalid("encryption failed"))?;
        let mut out = Vec::with_capacity(8 + NONCE + sealed.len());
        out.extend_from_slice(SEALED_MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The content of a sealed object (`what` names it in errors).
    pub fn open(&self, what: &Path, name: &str, bytes: &[u8]) -> Result<Vec<u8>> {
        if bytes.len() < 8 + NONCE + TAG || &bytes[..8] != SEALED_MAGIC {
            return Err(Error::corrupt(
                what,
                "sealed object",
                0,
                "not an encrypted diskkit object (too short or bad magic)",
            ));
        }
        let nonce = chacha20poly1305::XNonce::try_from(&bytes[8..8 + NONCE])
            .map_err(|_| Error::corrupt(what, "sealed object", 8, "bad nonce"))?;
        self.cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: &bytes[8 + NONCE..],
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| {
                Error::corrupt(
                    what,
                    "sealed object",
                    (8 + NONCE) as u64,
                    "authentication failed (damaged, or not this object)",
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_and_binds_the_name() {
        let c = Crypto::new(&[7; 32]);
        let sealed = c.seal("abc", b"content").unwrap();
        assert_eq!(c.open(Path::new("x"), "abc", &sealed).unwrap(), b"content");
        assert!(c.open(Path::new("x"), "abd", &sealed).is_err());
        let other = Crypto::new(&[8; 32]);
        assert!(other.open(Path::new("x"), "abc", &sealed).is_err());
        assert_ne!(other.key_check(), c.key_check());
        assert_ne!(c.chunk_name(&[1; 32]), other.chunk_name(&[1; 32]));
        assert!(c.open(Path::new("x"), "abc", &sealed[..20]).is_err());
    }
}
