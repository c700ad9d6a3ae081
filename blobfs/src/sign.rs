//! ed25519 keys (PKCS#8 / SPKI PEM, as `openssl genpkey -algorithm ed25519` writes them) and
//! image header signatures.

use crate::format::{HEADER_SIZE, Header, SignatureSlot};
use crate::merkle::Hash;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an ed25519 key in PEM form (PKCS#8 private or SPKI public key)")]
    Format { path: String },
    #[error("cannot write key {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Identifier of a public key inside images: SHA-256 of its raw 32 bytes.
pub fn key_id(key: &VerifyingKey) -> Hash {
    Sha256::digest(key.as_bytes()).into()
}

/// Load a private key (PKCS#8 PEM).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = read_text(path)?;
    SigningKey::from_pkcs8_pem(&text).map_err(|_| KeyError::Format {
        path: path.display().to_string(),
    })
}

/// Load a public key (SPKI PEM). A private key file is accepted too: its public half is used,
/// so the same file works for signing and checking during development.
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = read_text(path)?;
    if let Ok(key) = VerifyingKey::from_public_key_pem(&text) {
        return Ok(key);
    }
    SigningKey::from_pkcs8_pem(&text)
        .map(|k| k.verifying_key())
        .map_err(|_| KeyError::Format {
            path: path.display().to_string(),
        })
}

fn read_text(path: &Path) -> Result<String, KeyError> {
    let bytes = fs::read(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|_| KeyError::Format {
        path: path.display().to_string(),
    })
}

/// Generate a key pair from the OS random source and write both halves as PEM: the private
/// key with mode 0600, never overwriting an existing file.
pub fn generate_key_pair(private: &Path, public: &Path) -> Result<VerifyingKey, KeyError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| KeyError::Write {
        path: private.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let key = SigningKey::from_bytes(&secret);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyError::Write {
            path: private.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
    write_new(private, pem.as_bytes(), 0o600)?;
    let public_pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeyError::Write {
            path: public.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
    write_new(public, public_pem.as_bytes(), 0o644)?;
    Ok(key.verifying_key())
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), KeyError> {
    let err = |source| KeyError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Sign an encoded header.
pub fn sign_header(key: &SigningKey, header: &[u8; HEADER_SIZE]) -> SignatureSlot {
    let sig = key.sign(&Header::signed_message(header));
    SignatureSlot {
        key_id: key_id(&key.verifying_key()),
        signature: sig.to_bytes(),
    }
}

/// Does any slot hold a valid (strictly verified) signature of `header` by one of `keys`?
/// Returns the matching key id.
pub fn find_valid_signature(
    keys: &[VerifyingKey],
    slots: &[SignatureSlot],
    header: &[u8; HEADER_SIZE],
) -> Option<Hash> {
    let msg = Header::signed_message(header);
    keys.iter().find_map(|key| {
        let id = key_id(key);
        slots
            .iter()
            .filter(|s| s.key_id == id)
            .any(|s| {
                key.verify_strict(&msg, &Signature::from_bytes(&s.signature))
                    .is_ok()
            })
            .then_some(id)
    })
}
