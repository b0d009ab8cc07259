//! Key fingerprints in the OpenSSH style: `SHA256:` and the unpadded base64 of a SHA-256 digest.
//!
//! The digest covers the certificate's SubjectPublicKeyInfo, not the whole certificate, so a
//! certificate re-issued for the same key (new name, new serial) keeps its fingerprint: what is
//! pinned and authorized is the key, as with ssh.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use rustls::pki_types::CertificateDer;
use rustls::server::ParsedCertificate;
use sha2::{Digest, Sha256};

const PREFIX: &str = "SHA256:";
/// Longest text accepted by the parser, so a hostile file cannot make us decode megabytes.
const MAX_TEXT_LEN: usize = 128;

/// SHA-256 of a certificate's SubjectPublicKeyInfo.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

/// Why a fingerprint could not be parsed or computed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FingerprintError {
    #[error("fingerprint {0:?} does not start with `SHA256:`; copy it whole, e.g. SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU")]
    MissingPrefix(String),
    #[error("fingerprint {0:?} is not valid unpadded base64")]
    BadBase64(String),
    #[error("fingerprint {text:?} decodes to {len} bytes, a SHA-256 digest has 32")]
    WrongLength { text: String, len: usize },
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(#[source] rustls::Error),
}

impl Fingerprint {
    /// The fingerprint of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        Self(Sha256::digest(spki_der).into())
    }

    /// The fingerprint of the key a DER certificate carries.
    pub fn of_cert(cert: &CertificateDer<'_>) -> Result<Self, FingerprintError> {
        let parsed = ParsedCertificate::try_from(cert).map_err(FingerprintError::BadCertificate)?;
        Ok(Self::of_spki(&parsed.subject_public_key_info()))
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<[u8; 32]> for Fingerprint {
    fn from(digest: [u8; 32]) -> Self {
        Self(digest)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", STANDARD_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = FingerprintError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let shown = || text.chars().take(MAX_TEXT_LEN).collect::<String>();
        if text.len() > MAX_TEXT_LEN {
            return Err(FingerprintError::WrongLength {
                text: shown(),
                len: text.len(),
            });
        }
        let Some(b64) = text.strip_prefix(PREFIX) else {
            return Err(FingerprintError::MissingPrefix(shown()));
        };
        // OpenSSH prints no padding; accept it anyway since some tools add it back.
        let b64 = b64.trim_end_matches('=');
        let bytes = STANDARD_NO_PAD
            .decode(b64)
            .map_err(|_| FingerprintError::BadBase64(shown()))?;
        let digest: [u8; 32] =
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| FingerprintError::WrongLength {
                    text: shown(),
                    len: bytes.len(),
                })?;
        Ok(Self(digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_input_hashes_to_the_openssh_known_value() {
        // sha256("") printed the way `ssh-keygen -l` prints digests.
        assert_eq!(
            Fingerprint::of_spki(b"").to_string(),
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"
        );
    }

    #[test]
    fn display_parse_round_trip() {
        for seed in [0u8, 1, 0x7f, 0xff] {
            let fp = Fingerprint::from([seed; 32]);
            let text = fp.to_string();
            assert!(text.starts_with("SHA256:"));
            assert!(!text.ends_with('='));
            assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
        }
    }

    #[test]
    fn parse_accepts_padding_and_whitespace() {
        let fp = Fingerprint::of_spki(b"");
        let padded = format!("  {fp}=\n");
        assert_eq!(padded.parse::<Fingerprint>().unwrap(), fp);
    }

    #[test]
    fn parse_rejects_bad_text() {
        type Check = fn(&FingerprintError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, FingerprintError::MissingPrefix(_))),
            ("MD5:aa:bb", |e| {
                matches!(e, FingerprintError::MissingPrefix(_))
            }),
            ("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU", |e| {
                matches!(e, FingerprintError::MissingPrefix(_))
            }),
            ("SHA256:not base64!", |e| {
                matches!(e, FingerprintError::BadBase64(_))
            }),
            ("SHA256:AAAA", |e| {
                matches!(e, FingerprintError::WrongLength { len: 3, .. })
            }),
            (
                "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                |e| matches!(e, FingerprintError::WrongLength { len: 38, .. }),
            ),
        ];
        for (text, expected) in cases {
            let err = text.parse::<Fingerprint>().unwrap_err();
            assert!(expected(&err), "{text:?} gave {err:?}");
        }
        let long = format!("SHA256:{}", "A".repeat(10_000));
        assert!(matches!(
            long.parse::<Fingerprint>(),
            Err(FingerprintError::WrongLength { .. })
        ));
    }

    #[test]
    fn garbage_certificate_is_an_error() {
        let cert = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01]);
        assert!(matches!(
            Fingerprint::of_cert(&cert),
            Err(FingerprintError::BadCertificate(_))
        ));
    }
}
