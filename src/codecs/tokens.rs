//! The JWTs subscribers and publishers present: verified with `--jwt-secret` (HS256) or the
//! public keys of `--jwt-keys` (a PEM file or a JWKS document: RS256, ES256, EdDSA; reloaded when
//! the file changes, so keys can rotate), and what their claims allow. Pure but for reading the file.

use std::path::PathBuf;
use std::sync::RwLock;
use std::time::SystemTime;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// A room name, or a prefix of names ending in `*` (`league:12:*`, `*` for every room).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomPattern(String);

impl RoomPattern {
    pub fn new(pattern: &str) -> Self {
        Self(pattern.trim().to_string())
    }

    pub fn matches(&self, room: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => room.starts_with(prefix),
            None => self.0 == room,
        }
    }

    /// A comma-separated list, as the options take it.
    pub fn list(text: &str) -> Vec<Self> {
        text.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(Self::new)
            .collect()
    }
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Rooms it may subscribe to besides `user:{sub}`.
    pub rooms: Vec<RoomPattern>,
    /// Rooms it may publish to.
    pub publish: Vec<RoomPattern>,
    /// It may read the operations page (`GET /ops`, `GET /v1/ops`): claim `"ops": true`.
    pub ops: bool,
}

impl Claims {
    /// Whether the token may listen to `room`: its own `user:{sub}`, or one its `rooms` allow.
    pub fn may_listen(&self, room: &str) -> bool {
        room.strip_prefix("user:") == Some(self.sub.as_str()) || self.rooms.iter().any(|p| p.matches(room))
    }

    pub fn may_publish(&self, room: &str) -> bool {
        self.publish.iter().any(|p| p.matches(room))
    }
}

#[derive(Deserialize)]
struct RawClaims {
    sub: String,
    exp: u64,
    #[serde(default)]
    rooms: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    ops: bool,
}

/// Why a token was refused (the message of error `bad_token`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("this server takes no tokens (no --jwt-secret or --jwt-keys)")]
    NotConfigured,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid: {0}")]
    Invalid(String),
}

/// Where keys come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenSettings {
    pub secret: Option<String>,
    pub keys_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

/// A public key of the key file, with the algorithms it verifies and (JWKS) its `kid`.
struct PublicKey {
    algorithms: &'static [Algorithm],
    key: DecodingKey,
    kid: Option<String>,
}

impl PublicKey {
    /// Whether this key may verify a token of `alg` naming `kid`: a token naming a key is tried
    /// only on that key and on keys without a `kid`.
    fn fits(&self, alg: Algorithm, kid: Option<&str>) -> bool {
        self.algorithms.contains(&alg)
            && match (kid, self.kid.as_deref()) {
                (Some(wanted), Some(own)) => wanted == own,
                _ => true,
            }
    }
}

const RSA: &[Algorithm] = &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512];
const ES256: &[Algorithm] = &[Algorithm::ES256];
const EDDSA: &[Algorithm] = &[Algorithm::EdDSA];

/// Verifies tokens. Cheap to share (`Arc`); the key file is re-read by `reload_if_changed`.
pub struct TokenVerifier {
    settings: TokenSettings,
    secret: Option<DecodingKey>,
    keys: RwLock<(Option<SystemTime>, Vec<PublicKey>)>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("secret", &self.secret.is_some())
            .field("keys_file", &self.settings.keys_file)
            .finish()
    }
}

impl TokenVerifier {
    /// Loads the key file, if there is one: a file that cannot be read or holds no key is an error.
    pub fn new(settings: TokenSettings) -> Result<Self, String> {
        let secret = settings
            .secret
            .as_deref()
            .map(|s| DecodingKey::from_secret(s.as_bytes()));
        let verifier = Self {
            settings,
            secret,
            keys: RwLock::new((None, Vec::new())),
        };
        if let Some(path) = &verifier.settings.keys_file {
            let (modified, keys) = load_keys(path)?;
            *verifier.keys.write().unwrap_or_else(|p| p.into_inner()) = (modified, keys);
        }
        Ok(verifier)
    }

    pub fn is_configured(&self) -> bool {
        self.secret.is_some() || self.settings.keys_file.is_some()
    }

    /// Re-reads the key file when its modification time changed; a file that no longer parses
    /// keeps the keys in use (and says why).
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let Some(path) = &self.settings.keys_file else {
            return Ok(false);
        };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified == self.keys.read().unwrap_or_else(|p| p.into_inner()).0 {
            return Ok(false);
        }
        let (modified, keys) = load_keys(path)?;
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = (modified, keys);
        Ok(true)
    }

    /// Verifies `token` and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if !self.is_configured() {
            return Err(TokenError::NotConfigured);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let mut last = TokenError::Invalid(format!("no key for {:?}", header.alg));
        let try_key = |key: &DecodingKey, last: &mut TokenError| match jsonwebtoken::decode::<RawClaims>(
            token,
            key,
            &self.validation(header.alg),
        ) {
            Ok(data) => Some(data.claims),
            Err(error) => {
                *last = match error.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                    _ => TokenError::Invalid(error.to_string()),
                };
                None
            }
        };
        let claims = if header.alg == Algorithm::HS256 {
            self.secret.as_ref().and_then(|key| try_key(key, &mut last))
        } else {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            keys.1
                .iter()
                .filter(|k| k.fits(header.alg, header.kid.as_deref()))
                .find_map(|k| try_key(&k.key, &mut last))
        };
        let raw = claims.ok_or(last)?;
        Ok(Claims {
            sub: raw.sub,
            exp: raw.exp,
            rooms: raw.rooms.iter().map(|r| RoomPattern::new(r)).collect(),
            publish: raw.publish.iter().map(|r| RoomPattern::new(r)).collect(),
            ops: raw.ops,
        })
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &self.settings.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &self.settings.issuer {
            validation.set_issuer(&[issuer]);
        }
        validation
    }
}

/// The public keys of the key file: a JWKS document (`{"keys": [...]}`) when it starts with `{`,
/// else each PEM `BEGIN PUBLIC KEY` (or `RSA PUBLIC KEY`) block, as RSA, EC (P-256) or Ed25519,
/// whichever it parses as.
fn load_keys(path: &std::path::Path) -> Result<(Option<SystemTime>, Vec<PublicKey>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--jwt-keys {}: {e}", path.display()))?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let keys = if text.trim_start().starts_with('{') {
        jwks_keys(&text).map_err(|e| format!("--jwt-keys {}: {e}", path.display()))?
    } else {
        pem_keys(&text)
    };
    if keys.is_empty() {
        return Err(format!("--jwt-keys {}: no public key in it", path.display()));
    }
    Ok((modified, keys))
}

fn pem_keys(text: &str) -> Vec<PublicKey> {
    let mut keys = Vec::new();
    for block in pem_blocks(text) {
        let pem = block.as_bytes();
        let (algorithms, key) = if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            (RSA, key)
        } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            (ES256, key)
        } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
            (EDDSA, key)
        } else {
            continue;
        };
        keys.push(PublicKey {
            algorithms,
            key,
            kid: None,
        });
    }
    keys
}

/// The public keys of a JWKS document (RFC 7517 §5): RSA, EC on P-256, OKP Ed25519. Keys of
/// other kinds or curves, symmetric keys and keys whose `alg` or `use` rule them out for
/// verifying signatures are skipped; a document that does not parse is an error.
fn jwks_keys(text: &str) -> Result<Vec<PublicKey>, String> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        let family: &'static [Algorithm] = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => RSA,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => ES256,
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => EDDSA,
            _ => continue,
        };
        let algorithms = match jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<Algorithm>().ok())
        {
            Some(alg) => match family.iter().position(|a| *a == alg) {
                Some(i) => &family[i..=i],
                None => continue,
            },
            None => family,
        };
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        keys.push(PublicKey {
            algorithms,
            key,
            kid: jwk.common.key_id.clone(),
        });
    }
    Ok(keys)
}

/// Each `-----BEGIN ...-----` to `-----END ...-----` block of a PEM file, lines included.
fn pem_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("-----BEGIN ") {
            current = Some(String::new());
        }
        if let Some(block) = current.as_mut() {
            block.push_str(line);
            block.push('\n');
        }
        if line.starts_with("-----END ") {
            blocks.extend(current.take());
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn now_s() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    fn hs256(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("token")
    }

    fn verifier(settings: TokenSettings) -> TokenVerifier {
        TokenVerifier::new(settings).expect("verifier")
    }

    #[test]
    fn an_hs256_token_gives_its_claims_and_what_they_allow() {
        let v = verifier(TokenSettings {
            secret: Some("s3cret".into()),
            ..TokenSettings::default()
        });
        let token = hs256(
            "s3cret",
            serde_json::json!({"sub": "55", "exp": now_s() + 60, "rooms": ["league:12:*", "game:1"], "publish": ["game:*"]}),
        );
        let claims = v.verify(&token).expect("valid");
        assert_eq!((claims.sub.as_str(), claims.rooms.len()), ("55", 2));
        assert!(claims.may_listen("user:55") && claims.may_listen("league:12:team:3") && claims.may_listen("game:1"));
        assert!(!claims.may_listen("user:56") && !claims.may_listen("user:555") && !claims.may_listen("game:2"));
        assert!(claims.may_publish("game:9") && !claims.may_publish("user:55"));
    }

    #[test]
    fn expired_forged_or_misaddressed_tokens_are_refused() {
        let v = verifier(TokenSettings {
            secret: Some("s3cret".into()),
            issuer: Some("platform".into()),
            audience: Some("courtside".into()),
            ..TokenSettings::default()
        });
        let good = serde_json::json!({"sub": "1", "exp": now_s() + 60, "iss": "platform", "aud": "courtside"});
        assert!(v.verify(&hs256("s3cret", good.clone())).is_ok());
        let mut expired = good.clone();
        expired["exp"] = serde_json::json!(now_s() - 1);
        assert_eq!(v.verify(&hs256("s3cret", expired)), Err(TokenError::Expired));
        assert!(matches!(
            v.verify(&hs256("other", good.clone())),
            Err(TokenError::Invalid(_))
        ));
        let mut wrong_issuer = good.clone();
        wrong_issuer["iss"] = serde_json::json!("someone");
        assert!(matches!(
            v.verify(&hs256("s3cret", wrong_issuer)),
            Err(TokenError::Invalid(_))
        ));
        let mut no_sub = good;
        no_sub.as_object_mut().expect("object").remove("sub");
        assert!(v.verify(&hs256("s3cret", no_sub)).is_err());
        assert!(matches!(v.verify("not.a.token"), Err(TokenError::Invalid(_))));
        assert_eq!(
            verifier(TokenSettings::default()).verify("x"),
            Err(TokenError::NotConfigured)
        );
    }

    #[test]
    fn es256_keys_come_from_a_pem_file_that_is_reloaded_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("courtside-jwt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("keys.pem");
        let sign = |pair: &rcgen::KeyPair| {
            let key = EncodingKey::from_ec_der(&pair.serialize_der());
            encode(
                &Header::new(Algorithm::ES256),
                &serde_json::json!({"sub": "7", "exp": now_s() + 60}),
                &key,
            )
            .expect("token")
        };
        let (first, second) = (
            rcgen::KeyPair::generate().expect("key"),
            rcgen::KeyPair::generate().expect("key"),
        );
        std::fs::write(&path, public_pem(&first)).expect("write");
        let v = verifier(TokenSettings {
            keys_file: Some(path.clone()),
            ..TokenSettings::default()
        });
        assert_eq!(v.verify(&sign(&first)).map(|c| c.sub), Ok("7".into()));
        assert!(v.verify(&sign(&second)).is_err());
        // Rotated: the new key only (a later modification time).
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, public_pem(&second)).expect("write");
        let later = SystemTime::now() + std::time::Duration::from_secs(2);
        let _ = std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(later));
        assert_eq!(v.reload_if_changed(), Ok(true));
        assert!(v.verify(&sign(&first)).is_err());
        assert!(v.verify(&sign(&second)).is_ok());
        // A file without keys keeps the keys in use.
        std::fs::write(&path, "nothing").expect("write");
        let _ = std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(later + std::time::Duration::from_secs(2)));
        assert!(v.reload_if_changed().is_err());
        assert!(v.verify(&sign(&second)).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_jwks_file_gives_its_signing_keys_chosen_by_kid() {
        use rcgen::PublicKeyData;
        let dir = std::env::temp_dir().join(format!("courtside-jwks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("keys.json");
        let (a, b, enc) = (
            rcgen::KeyPair::generate().expect("key"),
            rcgen::KeyPair::generate().expect("key"),
            rcgen::KeyPair::generate().expect("key"),
        );
        // A P-256 SubjectPublicKeyInfo ends with the point 0x04 || x || y.
        let ec_jwk = |pair: &rcgen::KeyPair, extra: serde_json::Value| {
            let spki = pair.subject_public_key_info();
            let point = &spki[spki.len() - 64..];
            let mut jwk = serde_json::json!({
                "kty": "EC", "crv": "P-256",
                "x": base64url(&point[..32]), "y": base64url(&point[32..]),
            });
            for (k, v) in extra.as_object().expect("object") {
                jwk[k] = v.clone();
            }
            jwk
        };
        let set = serde_json::json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0"},
            ec_jwk(&enc, serde_json::json!({"use": "enc", "kid": "e"})),
            ec_jwk(&a, serde_json::json!({"kid": "a", "alg": "ES256", "use": "sig"})),
            ec_jwk(&b, serde_json::json!({"kid": "b"})),
        ]});
        std::fs::write(&path, set.to_string()).expect("write");
        let v = verifier(TokenSettings {
            keys_file: Some(path.clone()),
            ..TokenSettings::default()
        });
        let sign = |pair: &rcgen::KeyPair, kid: Option<&str>| {
            let mut header = Header::new(Algorithm::ES256);
            header.kid = kid.map(str::to_string);
            let claims = serde_json::json!({"sub": "9", "exp": now_s() + 60});
            encode(&header, &claims, &EncodingKey::from_ec_der(&pair.serialize_der())).expect("token")
        };
        assert_eq!(v.verify(&sign(&a, Some("a"))).map(|c| c.sub), Ok("9".into()));
        assert!(v.verify(&sign(&b, Some("b"))).is_ok());
        assert!(
            v.verify(&sign(&b, None)).is_ok(),
            "no kid: every key of the algorithm is tried"
        );
        assert!(v.verify(&sign(&a, Some("b"))).is_err(), "a kid names the one key");
        assert!(
            v.verify(&sign(&enc, Some("e"))).is_err(),
            "an encryption key verifies nothing"
        );
        // A document without a signing key, or that is not JWKS, is refused.
        std::fs::write(&path, r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).expect("write");
        assert!(TokenVerifier::new(v.settings.clone()).is_err());
        std::fs::write(&path, r#"{"keys": 3}"#).expect("write");
        assert!(TokenVerifier::new(v.settings.clone()).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn base64url(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut text = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                text.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            }
        }
        text
    }

    /// The key's SubjectPublicKeyInfo as PEM.
    fn public_pem(pair: &rcgen::KeyPair) -> String {
        use rcgen::PublicKeyData;
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let der = pair.subject_public_key_info();
        let mut text = String::new();
        for chunk in der.chunks(3) {
            let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
            for i in 0..4 {
                text.push(if i <= chunk.len() {
                    ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char
                } else {
                    '='
                });
            }
        }
        let lines: Vec<&str> = text
            .as_bytes()
            .chunks(64)
            .map(|l| std::str::from_utf8(l).unwrap_or(""))
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn room_patterns_are_names_or_prefixes() {
        assert!(RoomPattern::new("user:*").matches("user:5"));
        assert!(RoomPattern::new("*").matches("anything"));
        assert!(!RoomPattern::new("user:5").matches("user:55"));
        assert_eq!(RoomPattern::list("user:*, team:*,,").len(), 2);
    }
}
