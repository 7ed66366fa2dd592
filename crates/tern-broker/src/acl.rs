//! The ACL as the server uses it: the format, the parser and the checks are the core's
//! ([`tern_broker_core::acl`]); reading the file is done here, where I/O belongs.

use std::path::Path;

pub use tern_broker_core::acl::{Acl, Permission};

/// Reads and parses an ACL file; an error names the file (and the line, for a rule that
/// does not parse).
pub fn load(path: &Path) -> Result<Acl, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the ACL file {}: {e}", path.display()))?;
    Acl::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}
