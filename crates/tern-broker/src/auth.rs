//! Who may connect: a password file of salted argon2id hashes (the format of
//! `mosquitto_passwd`, `user:hash` per line, with PHC-string hashes) and whether clients
//! without a username are let in. Checked by the connection task before the core sees the
//! CONNECT, because a hash check takes milliseconds of CPU the core must not spend.

use std::collections::BTreeMap;
use std::path::Path;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use tern_codec::Connect;

use crate::core::Refusal;

/// Users and their password hashes, in file order by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: BTreeMap<String, String>,
}

impl PasswordFile {
    /// Reads a password file: `user:hash` lines, `#` comments and blank lines ignored. An
    /// error names the line.
    pub fn load(path: &Path) -> Result<PasswordFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the password file {}: {e}", path.display()))?;
        PasswordFile::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the text of a password file.
    pub fn parse(text: &str) -> Result<PasswordFile, String> {
        let mut users = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!("line {}: expected user:hash", n + 1));
            };
            if PasswordHash::new(hash).is_err() {
                return Err(format!(
                    "line {}: the hash of {user:?} is not a PHC string (make it with `tern passwd`)",
                    n + 1
                ));
            }
            users.insert(user.to_string(), hash.to_string());
        }
        Ok(PasswordFile { users })
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        self.users
            .iter()
            .map(|(u, h)| format!("{u}:{h}\n"))
            .collect()
    }

    /// Adds a user or changes their password.
    pub fn set(&mut self, user: &str, password: &[u8]) -> Result<(), String> {
        if user.is_empty() || user.contains(':') {
            return Err(format!(
                "{user:?}: a username must be non-empty and without ':'"
            ));
        }
        self.users.insert(user.to_string(), hash(password)?);
        Ok(())
    }

    /// Removes a user; false if there was none.
    pub fn remove(&mut self, user: &str) -> bool {
        self.users.remove(user).is_some()
    }

    /// How many users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file has no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `password` is `user`'s. An unknown user costs the same as a wrong password.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        // A fixed hash to check against for unknown users, so timing does not tell.
        const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$4B7QmO8VtL6eJ2m3sY0p6pWb2v6Vf0lZ4O1bBd1Yc2Q";
        let stored = self.users.get(user).map_or(DUMMY, String::as_str);
        let ok = PasswordHash::new(stored)
            .is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok());
        ok && self.users.contains_key(user)
    }
}

/// A salted argon2id hash of `password` as a PHC string.
pub fn hash(password: &[u8]) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom_salt(&mut salt)?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn getrandom_salt(out: &mut [u8]) -> Result<(), String> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(out))
        .map_err(|e| format!("cannot read /dev/urandom for a salt: {e}"))
}

/// Who may connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// When set, a client giving a username must give that user's password.
    pub passwords: Option<PasswordFile>,
    /// Whether clients without a username are let in (listeners may say otherwise).
    pub allow_anonymous: bool,
    /// What clients may publish, subscribe to and receive; `None`: everything.
    pub acl: Option<std::sync::Arc<crate::acl::Acl>>,
}

impl Access {
    /// Everyone may connect (tests, and a broker on loopback with no password file).
    pub fn open() -> Access {
        Access {
            passwords: None,
            allow_anonymous: true,
            acl: None,
        }
    }

    /// Whether `connect` may go on; the refusal if not: [`Refusal::BadUserNameOrPassword`]
    /// (0x86, 3.x return code 4) for credentials that do not check out,
    /// [`Refusal::NotAuthorized`] (0x87, return code 5) for an anonymous client where none
    /// are allowed.
    pub fn check(&self, connect: &Connect) -> Result<(), Refusal> {
        self.check_as(connect, self.allow_anonymous)
    }

    /// [`Access::check`] on a listener that does (or does not) let anonymous clients in.
    pub fn check_as(&self, connect: &Connect, allow_anonymous: bool) -> Result<(), Refusal> {
        match (&connect.username, &self.passwords) {
            (None, _) if allow_anonymous => Ok(()),
            (None, _) => Err(Refusal::NotAuthorized),
            (Some(user), Some(file)) => {
                let password = connect.password.as_deref().unwrap_or(&[]);
                if file.verify(user, password) {
                    Ok(())
                } else {
                    Err(Refusal::BadUserNameOrPassword)
                }
            }
            // No password file: a username is only a name, as in Mosquitto.
            (Some(_), None) if allow_anonymous => Ok(()),
            (Some(_), None) => Err(Refusal::BadUserNameOrPassword),
        }
    }

    /// Whether checking `connect` is expensive (a hash to verify).
    pub fn costly(&self, connect: &Connect) -> bool {
        connect.username.is_some() && self.passwords.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_password_verifies_and_nothing_else_does() {
        let mut f = PasswordFile::default();
        f.set("ann", b"s3cret").unwrap();
        let f = PasswordFile::parse(&f.to_text()).unwrap();
        assert!(f.verify("ann", b"s3cret"));
        assert!(!f.verify("ann", b"s3cret "));
        assert!(!f.verify("bob", b"s3cret"));
    }

    #[test]
    fn a_bad_line_is_named() {
        let e = PasswordFile::parse("# users\nann:$argon2id$bad\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = PasswordFile::parse("ann\n").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
    }
}
