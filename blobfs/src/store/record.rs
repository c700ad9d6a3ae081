//! The value stored in the store's index for each sealed blob. Its bytes come from the
//! RocksDB files under `DIR/index/`, which a store does not trust more than the blob files:
//! decoding checks the length, version and state, and anything else is corruption.

/// Index record of one sealed blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub size: u64,
}

const RECORD_VERSION: u8 = 1;
const RECORD_SEALED: u8 = 1;
const RECORD_SIZE: usize = 16;

impl Record {
    pub fn encode(&self) -> [u8; RECORD_SIZE] {
        let mut b = [0u8; RECORD_SIZE];
        b[0] = RECORD_VERSION;
        b[1] = RECORD_SEALED;
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    /// Decode a record read from the index; anything unexpected is corruption, not a panic.
    pub fn decode(b: &[u8]) -> Result<Record, String> {
        if b.len() != RECORD_SIZE {
            return Err(format!(
                "record of {} bytes (expected {RECORD_SIZE})",
                b.len()
            ));
        }
        if b[0] != RECORD_VERSION || b[1] != RECORD_SEALED || b[2..8] != [0; 6] {
            return Err("record has an unknown version or state".into());
        }
        Ok(Record {
            size: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        })
    }
}
