//! What an agent's event store holds, as bytes a test can search for
//! secrets: every file under the store as written, plus every chunk
//! decompressed. The chunks are LZ4-compressed, so a scan of the files
//! alone could not see a secret inside them. Open only after the agent
//! stopped (sled's lock).

use std::path::Path;

use guard_agent::{config::AgentConfig, store::EventStore};

pub fn store_plaintext(state_dir: &Path) -> Vec<u8> {
    let dir = AgentConfig::store_dir(state_dir);
    let mut out = all_bytes_under(&dir);
    assert!(!out.is_empty(), "no store files under {}", dir.display());
    let store = EventStore::open(&dir).expect("open the stopped agent's store");
    let chunks = store.decompressed_chunks().expect("decompress the chunks");
    assert!(!chunks.is_empty(), "the store holds no chunk");
    for c in chunks {
        out.extend(c);
    }
    out
}

/// The bytes of every file under `dir`, as they are on disk.
pub fn all_bytes_under(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(all_bytes_under(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.extend(b);
        }
    }
    out
}
