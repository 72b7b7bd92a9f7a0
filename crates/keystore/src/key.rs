//! Keys, their digests and their public ids.
//!
//! A key is `tg_` followed by the base62 form of 32 bytes from the operating system's random
//! number generator (43 characters, 256 bits of entropy): 46 ASCII characters in all. Only its
//! [`Digest`] (SHA-256 over the whole key string, prefix included) is ever stored. A key is
//! referred to everywhere else (logs, metrics labels, the admin API, Redis keys) by its
//! [`KeyId`], a separate random public identifier.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

use rand::{RngExt, TryRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{KeyError, Result};

/// The prefix every key starts with, so that leaked keys are recognisable (secret scanners).
pub const KEY_PREFIX: &str = "tg_";

/// Random bytes in a key.
pub const KEY_ENTROPY_BYTES: usize = 32;

/// Base62 characters encoding [`KEY_ENTROPY_BYTES`] bytes: 62^43 > 2^256 > 62^42.
const BODY_LEN: usize = 43;

/// Length of every key, prefix included.
pub const KEY_LEN: usize = KEY_PREFIX.len() + BODY_LEN;

/// The prefix of generated key ids.
pub const KEY_ID_PREFIX: &str = "key_";

/// Longest accepted key id.
const MAX_ID_LEN: usize = 64;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

// === impl ApiKey ===

/// A client's secret API key (plaintext).
///
/// It exists in memory only: when a key is issued (to be shown once) and while a presented key
/// is being checked. `Debug` prints `ApiKey(tg_…)` and there is no `Display`: the plaintext is
/// reached only through [`expose_secret`](Self::expose_secret). Equality is constant-time.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// A new key from the operating system's random number generator.
    pub fn generate() -> Result<ApiKey> {
        let mut bytes = [0u8; KEY_ENTROPY_BYTES];
        rand::rngs::SysRng
            .try_fill_bytes(&mut bytes)
            .map_err(|e| KeyError::backend("os-rng", e))?;
        Ok(ApiKey::from_entropy(&bytes))
    }

    /// The key whose random part is `bytes`.
    pub(crate) fn from_entropy(bytes: &[u8; KEY_ENTROPY_BYTES]) -> ApiKey {
        let body = base62_encode(bytes);
        let mut key = String::with_capacity(KEY_LEN);
        key.push_str(KEY_PREFIX);
        key.extend(body.iter().map(|&b| char::from(b)));
        ApiKey(key)
    }

    /// `presented` as a key, or [`KeyError::Unknown`] when it cannot be one (wrong prefix,
    /// length or alphabet, or a body above 2^256). Needs no store: malformed input is refused
    /// without a lookup.
    pub fn parse(presented: &str) -> Result<ApiKey> {
        if is_well_formed(presented) {
            Ok(ApiKey(presented.to_owned()))
        } else {
            Err(KeyError::Unknown)
        }
    }

    /// The plaintext, to show to the key's owner once. Never log it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// The SHA-256 digest stored in place of the key.
    pub fn digest(&self) -> Digest {
        Digest::of_str(&self.0)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({KEY_PREFIX}…)")
    }
}

impl PartialEq for ApiKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for ApiKey {}

impl FromStr for ApiKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<ApiKey> {
        ApiKey::parse(s)
    }
}

/// Whether `s` has the form of a key: `tg_` and 43 base62 characters encoding a value below
/// 2^256. Allocates nothing, and costs a comparison, not a decode: every request with a key
/// asks it.
pub fn is_well_formed(s: &str) -> bool {
    s.len() == KEY_LEN
        && s.strip_prefix(KEY_PREFIX).is_some_and(|body| {
            let body = body.as_bytes();
            // The alphabet is in ASCII order and every body has the same length, so the
            // bodies' byte order is their numbers' order.
            body.iter().all(u8::is_ascii_alphanumeric) && body <= &MAX_BODY[..]
        })
}

/// The body of the largest key, 2^256 - 1.
const MAX_BODY: [u8; BODY_LEN] = base62_encode(&[0xff; KEY_ENTROPY_BYTES]);

/// The base62 form of `bytes` read as a big-endian number, left-padded with `0` to 43 digits.
pub(crate) const fn base62_encode(bytes: &[u8; KEY_ENTROPY_BYTES]) -> [u8; BODY_LEN] {
    let mut num = *bytes;
    let mut out = [b'0'; BODY_LEN];
    let mut d = BODY_LEN;
    while d > 0 {
        d -= 1;
        let mut rem = 0u32;
        let mut i = 0;
        while i < KEY_ENTROPY_BYTES {
            let acc = (rem << 8) | num[i] as u32;
            // acc < 62 * 256, so the quotient fits a byte.
            num[i] = (acc / 62) as u8;
            rem = acc % 62;
            i += 1;
        }
        out[d] = BASE62[rem as usize];
    }
    out
}

/// The 32 bytes a 43-digit base62 string encodes; `None` for another length, a character
/// outside the alphabet, or a value of 2^256 or more. The tests' reference for
/// [`base62_encode`] and [`is_well_formed`].
#[cfg(test)]
fn base62_decode(s: &[u8]) -> Option<[u8; KEY_ENTROPY_BYTES]> {
    if s.len() != BODY_LEN {
        return None;
    }
    let mut num = [0u8; KEY_ENTROPY_BYTES];
    for &c in s {
        let mut carry = u32::from(base62_digit(c)?);
        for byte in num.iter_mut().rev() {
            let acc = u32::from(*byte) * 62 + carry;
            *byte = (acc & 0xff) as u8;
            carry = acc >> 8;
        }
        if carry != 0 {
            return None;
        }
    }
    Some(num)
}

#[cfg(test)]
fn base62_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'Z' => Some(c - b'A' + 10),
        b'a'..=b'z' => Some(c - b'a' + 36),
        _ => None,
    }
}

// === impl Digest ===

/// SHA-256 of a key: what stores keep and look keys up by.
///
/// Equality ([`PartialEq`] and [`ConstantTimeEq`]) is constant-time. `Debug` shows the first
/// 8 hex digits.
#[derive(Clone, Copy)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of `key`.
    pub fn of(key: &ApiKey) -> Digest {
        key.digest()
    }

    /// The 32 bytes as four native-endian words.
    fn words(&self) -> [u64; 4] {
        let mut words = [0u64; 4];
        for (word, bytes) in words.iter_mut().zip(self.0.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            *word = u64::from_ne_bytes(b);
        }
        words
    }

    /// SHA-256 of the UTF-8 bytes of `s`.
    pub(crate) fn of_str(s: &str) -> Digest {
        Digest(Sha256::digest(s.as_bytes()).into())
    }

    /// A digest from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Digest {
        Digest(bytes)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lower-case hex digits, as stored in SQL.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A digest from 64 hex digits; [`KeyError::Invalid`] otherwise.
    pub fn from_hex(s: &str) -> Result<Digest> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes)
            .map_err(|e| KeyError::Invalid(format!("digest is not 64 hex digits: {e}")))?;
        Ok(Digest(bytes))
    }
}

impl ConstantTimeEq for Digest {
    /// Word by word: the four XORs ORed together, then one constant-time test of the result
    /// (`subtle`'s byte slices take a barrier per byte: ten times the instructions, on every
    /// authenticated request).
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        let diff = self
            .words()
            .iter()
            .zip(other.words())
            .fold(0u64, |acc, (a, b)| acc | (a ^ b));
        diff.ct_eq(&0)
    }
}

impl PartialEq for Digest {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for Digest {}

impl Hash for Digest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({}…)", hex::encode(&self.0[..4]))
    }
}

// === impl KeyId ===

/// A key's public identifier: `key_` and 16 hex digits when generated. Used in logs, metrics
/// labels, the admin API and Redis keys instead of the key.
///
/// Any 1 to 64 characters of `[A-Za-z0-9_-]` are accepted (imported keys), so an id is always
/// safe in a URL path, a label or a Redis key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(String);

impl KeyId {
    /// A new random id, `key_` + 16 hex digits.
    pub fn generate() -> KeyId {
        let bytes: [u8; 8] = rand::rng().random();
        KeyId(format!("{KEY_ID_PREFIX}{}", hex::encode(bytes)))
    }

    /// `s` as an id; [`KeyError::Invalid`] when it is empty, longer than 64 characters or has a
    /// character outside `[A-Za-z0-9_-]`.
    pub fn parse(s: &str) -> Result<KeyId> {
        let ok = !s.is_empty()
            && s.len() <= MAX_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(KeyId(s.to_owned()))
        } else {
            Err(KeyError::Invalid(format!(
                "key id must be 1 to {MAX_ID_LEN} characters of [A-Za-z0-9_-]"
            )))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for KeyId {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<KeyId> {
        KeyId::parse(s)
    }
}

impl TryFrom<String> for KeyId {
    type Error = KeyError;

    fn try_from(s: String) -> Result<KeyId> {
        KeyId::parse(&s)
    }
}

impl From<KeyId> for String {
    fn from(id: KeyId) -> String {
        id.0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn generated_keys_have_the_documented_form() {
        let key = ApiKey::generate().unwrap();
        let s = key.expose_secret();
        assert_eq!(s.len(), KEY_LEN);
        assert_eq!(KEY_LEN, 46);
        assert!(s.starts_with("tg_"));
        assert!(s[3..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert!(is_well_formed(s));
        assert_eq!(ApiKey::parse(s).unwrap(), key);
        assert_ne!(ApiKey::generate().unwrap(), key, "random");
    }

    #[test]
    fn parse_refuses_what_cannot_be_a_key() {
        let good = ApiKey::generate().unwrap();
        let s = good.expose_secret();
        let max = format!(
            "tg_{}",
            String::from_utf8(base62_encode(&[0xff; 32]).to_vec()).unwrap()
        );
        assert!(is_well_formed(&max), "2^256 - 1 is a key");
        let too_big = format!("tg_{}", "z".repeat(43));
        for bad in [
            "",
            "tg_",
            "Bearer",
            &s[..45],
            &format!("{s}0"),
            &format!("tk_{}", &s[3..]),
            &format!("TG_{}", &s[3..]),
            &format!("tg_{}-", &s[3..45]),
            &format!("tg_{}é", &s[3..44]),
            &format!("tg_{}=", &s[3..45]),
            &too_big,
        ] {
            assert!(!is_well_formed(bad), "{bad:?}");
            assert!(
                matches!(ApiKey::parse(bad), Err(KeyError::Unknown)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn base62_edges() {
        assert_eq!(&base62_encode(&[0; 32]), &[b'0'; 43]);
        let mut one = [0u8; 32];
        one[31] = 1;
        assert_eq!(base62_encode(&one)[42], b'1');
        let mut sixty_two = [0u8; 32];
        sixty_two[31] = 62;
        assert_eq!(&base62_encode(&sixty_two)[41..], b"10");
        assert_eq!(base62_decode(&base62_encode(&[0xff; 32])), Some([0xff; 32]));
        assert_eq!(base62_decode(&[b'z'; 43]), None, "above 2^256");
        assert_eq!(base62_decode(&[b'0'; 42]), None);
    }

    proptest! {
        #[test]
        fn base62_round_trips(bytes in any::<[u8; 32]>()) {
            let encoded = base62_encode(&bytes);
            prop_assert_eq!(base62_decode(&encoded), Some(bytes));
            let key = ApiKey::from_entropy(&bytes);
            prop_assert!(is_well_formed(key.expose_secret()));
        }

        #[test]
        fn well_formed_is_exactly_what_decodes(
            body in "[0-9A-Za-z]{43}",
            near_max in 0usize..43,
            digit in "[0-9A-Za-z]",
        ) {
            prop_assert_eq!(
                is_well_formed(&format!("tg_{body}")),
                base62_decode(body.as_bytes()).is_some()
            );
            // Bodies around the largest key, where the order decides.
            let mut edge = MAX_BODY;
            edge[near_max] = digit.as_bytes()[0];
            let edge = std::str::from_utf8(&edge).unwrap();
            prop_assert_eq!(
                is_well_formed(&format!("tg_{edge}")),
                base62_decode(edge.as_bytes()).is_some()
            );
        }

        #[test]
        fn order_is_kept(a in any::<[u8; 32]>(), b in any::<[u8; 32]>()) {
            // Fixed width, alphabet in ASCII order: string order is number order.
            prop_assert_eq!(a.cmp(&b), base62_encode(&a).cmp(&base62_encode(&b)));
        }
    }

    #[test]
    fn digest_is_sha256_of_the_whole_key() {
        let key = ApiKey::parse(&format!("tg_{}", "0".repeat(43))).unwrap();
        // sha256("tg_000…0") computed independently.
        let expected = Sha256::digest(format!("tg_{}", "0".repeat(43)).as_bytes());
        assert_eq!(key.digest().as_bytes()[..], expected[..]);
        assert_eq!(key.digest().to_hex().len(), 64);
        assert_eq!(
            Digest::from_hex(&key.digest().to_hex()).unwrap(),
            key.digest()
        );
        assert!(Digest::from_hex("abc").is_err());
        assert!(Digest::from_hex(&"g".repeat(64)).is_err());
        // Known vector: SHA-256("abc").
        assert_eq!(
            Digest::of_str("abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn digests_compare_in_constant_time() {
        fn assert_ct<T: ConstantTimeEq + PartialEq>() {}
        assert_ct::<Digest>();
        let a = Digest::of_str("a");
        let b = Digest::of_str("b");
        assert!(bool::from(a.ct_eq(&a)));
        assert!(!bool::from(a.ct_eq(&b)));
        // `==` is `ct_eq`: equal when every byte is, whichever bit of whichever byte differs.
        for i in 0..32 {
            for bit in 0..8 {
                let mut bytes = *a.as_bytes();
                bytes[i] ^= 1 << bit;
                let c = Digest::from_bytes(bytes);
                assert_ne!(a, c);
                assert_eq!(a == c, bool::from(a.ct_eq(&c)));
            }
        }
        assert_eq!(a, Digest::from_bytes(*a.as_bytes()));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = ApiKey::generate().unwrap();
        let debug = format!("{key:?} {:?} {:#?}", Some(&key), vec![key.clone()]);
        assert!(!debug.contains(&key.expose_secret()[3..]), "{debug}");
        assert!(!debug.contains(&key.expose_secret()[3..11]), "{debug}");
        let digest = format!("{:?}", key.digest());
        assert_eq!(digest.len(), "Digest(…)".len() + 8);
    }

    #[test]
    fn key_ids() {
        let id = KeyId::generate();
        assert!(id.as_str().starts_with("key_"));
        assert_eq!(id.as_str().len(), 20);
        assert!(id.as_str()[4..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(KeyId::generate(), id);
        assert_eq!(KeyId::parse(id.as_str()).unwrap(), id);
        assert_eq!(id.to_string(), id.as_str());
        for ok in ["a", "imported-7", "key_0123456789abcdef", &"x".repeat(64)] {
            assert!(KeyId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "../x", "é", &"x".repeat(65), "a\n"] {
            assert!(
                matches!(KeyId::parse(bad), Err(KeyError::Invalid(_))),
                "{bad:?}"
            );
        }
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<KeyId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<KeyId>("\"a/b\"").is_err());
    }
}
