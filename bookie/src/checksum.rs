//! Entry checksums: CRC32C over `(ledger id, entry id, payload)`, computed by the writer and
//! checked by bookies on receipt and on every read from disk, and by readers on receipt. The
//! ids are inside the checksum so an entry served under the wrong key is caught too.

/// The checksum of one entry.
pub fn entry_checksum(ledger: u64, entry: i64, payload: &[u8]) -> u32 {
    let mut ids = [0u8; 16];
    ids[..8].copy_from_slice(&ledger.to_be_bytes());
    ids[8..].copy_from_slice(&entry.to_be_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&ids), payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_covered() {
        let a = entry_checksum(1, 2, b"x");
        assert_ne!(a, entry_checksum(1, 3, b"x"));
        assert_ne!(a, entry_checksum(2, 2, b"x"));
        assert_ne!(a, entry_checksum(1, 2, b"y"));
        assert_eq!(a, entry_checksum(1, 2, b"x"));
    }
}
