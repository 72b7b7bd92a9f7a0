//! Canonical request signatures and the MD5 cache keys derived from them.

use std::fmt;

use md5::{Digest, Md5};

use crate::error::CacheError;

/// A cache key: the MD5 digest of a canonical request signature.
///
/// MD5 is used for its speed and compact keys, not for security: the full signature is stored
/// with every entry and compared on lookup, so a collision is a miss, never a wrong body.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 16]);

impl CacheKey {
    /// The key of a canonical signature.
    pub fn of(signature: &str) -> Self {
        let digest = Md5::digest(signature.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest);
        CacheKey(out)
    }

    /// Builds a key from its raw bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        CacheKey(bytes)
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Lower-case hex, 32 characters (how SQL stores keep it).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 32 hex characters.
    pub fn from_hex(s: &str) -> Result<Self, CacheError> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out)
            .map_err(|e| CacheError::InvalidRequest(format!("cache key {s:?}: {e}")))?;
        Ok(CacheKey(out))
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({self})")
    }
}

/// A canonical request signature and its key.
///
/// The signature is injective over (method, upstream, path, normalized query, canonical body):
/// every component but the last is percent-encoded so it cannot contain the separator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    text: String,
    key: CacheKey,
}

impl Signature {
    /// Wraps an already-canonical signature text.
    pub fn from_canonical(text: String) -> Self {
        let key = CacheKey::of(&text);
        Signature { text, key }
    }

    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The MD5 key.
    pub fn key(&self) -> CacheKey {
        self.key
    }

    /// Consumes the signature, giving its text.
    pub fn into_string(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let k = CacheKey::of("abc");
        assert_eq!(k.to_hex(), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(CacheKey::from_hex(&k.to_hex()).ok(), Some(k));
        assert!(CacheKey::from_hex("zz").is_err());
        assert_eq!(format!("{k}"), k.to_hex());
    }
}
