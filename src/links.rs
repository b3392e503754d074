//! Invitation links and codes.
//!
//! A link token is `base64url(HMAC-SHA256(link secret, invitation id ||
//! 16-byte random nonce))`: 256 bits that cannot be guessed without the
//! secret, which lives only in configuration. The database keeps the nonce
//! and the token's SHA-256 (to find the invitation); neither the token nor
//! anything that yields it without the secret is stored, and no token travels
//! through RabbitMQ. The same derivation lets the QR endpoint redraw an
//! offline link later.

use base64::Engine;
use hmac::{Hmac, Mac};
use rand::{Rng, RngCore};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub fn new_nonce() -> Vec<u8> {
    let mut n = vec![0u8; 16];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

pub fn token(secret: &[u8], invitation_id: Uuid, nonce: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| {
        // HMAC accepts keys of any length; this branch cannot be taken.
        <Hmac<Sha256> as Mac>::new_from_slice(b"prereg").expect("static key")
    });
    mac.update(invitation_id.as_bytes());
    mac.update(nonce);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

pub fn hash(token_or_code: &str) -> Vec<u8> {
    Sha256::digest(token_or_code.trim().as_bytes()).to_vec()
}

/// The stored form of an offline code: an HMAC keyed with the link secret
/// (a code has only 50 bits, so a plain hash could be reversed by trying
/// every code), over the normalized code.
pub fn code_hash(secret: &[u8], code: &str) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| <Hmac<Sha256> as Mac>::new_from_slice(b"prereg").expect("static key"));
    mac.update(b"offline-code\0");
    mac.update(normalize_code(code).as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// 10 characters from an alphabet without look-alikes (50 bits).
pub fn new_code() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..10)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Codes are typed by people: case and spaces do not matter.
pub fn normalize_code(code: &str) -> String {
    code.chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .collect::<String>()
        .to_ascii_uppercase()
}

pub fn link_url(public_url: &str, token: &str) -> String {
    format!("{}/i/{token}", public_url.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_keyed_and_long() {
        let id = Uuid::now_v7();
        let n = new_nonce();
        let t = token(b"secret", id, &n);
        assert_eq!(t, token(b"secret", id, &n));
        assert_ne!(t, token(b"other", id, &n));
        assert_ne!(t, token(b"secret", id, &new_nonce()));
        assert_eq!(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&t)
                .unwrap()
                .len(),
            32
        );
        assert_eq!(hash(&t).len(), 32);
    }

    #[test]
    fn codes() {
        let c = new_code();
        assert_eq!(c.len(), 10);
        assert_eq!(
            normalize_code(&format!(" {}-{} ", &c[..5].to_lowercase(), &c[5..])),
            c
        );
    }
}
