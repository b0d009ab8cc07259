//! Relay tickets signed and checked: the originating client's permission for one relay to push
//! one release of one app (see `sync_core::relay`).
//!
//! A daemon that receives a push from a key it does not authorize accepts it only with a ticket
//! that [`verify`] passes: signed by a key the app authorizes, naming the key the relay connected
//! with, and naming exactly the release and manifest the push announces. All of that is checked
//! from the `Hello` alone, before the daemon takes a lock or touches its disk. A ticket cannot be
//! stretched to other content: a relay could only ever present it for the release the client
//! built, whose files the daemon verifies against the manifest anyway.

use std::collections::HashSet;

use rustls::SignatureScheme;
use sync_core::relay::{RelayError, Ticket, TicketBody};
use sync_core::wire::AppName;
use sync_core::{Hash, ReleaseId};

use super::{provider, Fingerprint, Identity};

/// DER SubjectPublicKeyInfo of an Ed25519 key, up to the 32 key bytes (RFC 8410).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why a ticket was not made or not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TicketError {
    #[error("cannot sign a relay ticket with this identity: {0}; use an Ed25519 identity made by `relsync keygen`")]
    Sign(String),
    #[error(transparent)]
    Malformed(#[from] RelayError),
    #[error("relay ticket signature does not verify; the relay is refused")]
    BadSignature,
    #[error("relay ticket is signed by key {signer}, which app {app} does not authorize; add it to apps.{app}.authorized_keys or push from an authorized client")]
    UnauthorizedSigner { signer: Fingerprint, app: AppName },
    #[error("relay ticket names relay key {ticket}, but the relay connected with key {presented}; the relay is refused")]
    WrongRelay {
        ticket: Fingerprint,
        presented: Fingerprint,
    },
    #[error("relay ticket is for app {ticket}, but the push is for app {push}")]
    WrongApp { ticket: AppName, push: AppName },
    #[error("relay ticket is for release {ticket}, but the push is for release {push}")]
    WrongRelease { ticket: ReleaseId, push: ReleaseId },
    #[error("relay ticket names another manifest than the push of release {release} announces; the relay is refused")]
    WrongManifest { release: ReleaseId },
}

/// The fingerprint of a raw Ed25519 public key, as `Fingerprint::of_cert` computes it.
pub fn fingerprint_of_raw(public_key: &[u8; 32]) -> Fingerprint {
    let mut spki = ED25519_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(public_key);
    Fingerprint::of_spki(&spki)
}

/// Signs a ticket letting the daemon with key `relay` push `release` (manifest encoding digest
/// `manifest_digest`) of `app`; returns its encoding.
pub fn sign(
    identity: &Identity,
    app: &AppName,
    release: &ReleaseId,
    manifest_digest: Hash,
    relay: Fingerprint,
) -> Result<Vec<u8>, TicketError> {
    let key = rustls::crypto::ring::sign::any_eddsa_type(identity.key_der())
        .map_err(|e| TicketError::Sign(e.to_string()))?;
    let spki = key
        .public_key()
        .ok_or_else(|| TicketError::Sign("the key has no public key".into()))?;
    let raw = spki
        .as_ref()
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or_else(|| TicketError::Sign("the key is not Ed25519".into()))?;
    let body = TicketBody {
        app: app.clone(),
        release: release.clone(),
        manifest_digest,
        relay_key: *relay.as_bytes(),
        signer: raw,
    };
    let signer = key
        .choose_scheme(&[SignatureScheme::ED25519])
        .ok_or_else(|| TicketError::Sign("the key cannot make Ed25519 signatures".into()))?;
    let signature = signer
        .sign(&body.signed_bytes())
        .map_err(|e| TicketError::Sign(e.to_string()))?;
    Ok(Ticket { body, signature }.encode())
}

/// What a push announces and who sent it: what a ticket must match.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub app: &'a AppName,
    pub release: &'a ReleaseId,
    pub manifest_digest: &'a Hash,
    /// The key the relay presented in the TLS handshake.
    pub peer: Fingerprint,
    /// Keys the app authorizes.
    pub authorized: &'a HashSet<Fingerprint>,
}

/// Accepts `encoded` only if it is a well-formed ticket, correctly signed by a key `expect`
/// authorizes, for exactly the app, release, manifest and relay key of `expect`.
pub fn verify(encoded: &[u8], expect: &Expected<'_>) -> Result<Ticket, TicketError> {
    let ticket = Ticket::decode(encoded)?;
    let b = &ticket.body;
    let algorithms = provider().signature_verification_algorithms;
    let verified = algorithms
        .mapping
        .iter()
        .filter(|(scheme, _)| *scheme == SignatureScheme::ED25519)
        .flat_map(|(_, algs)| algs.iter())
        .any(|alg| {
            alg.verify_signature(&b.signer, &b.signed_bytes(), &ticket.signature)
                .is_ok()
        });
    if !verified {
        return Err(TicketError::BadSignature);
    }
    let signer = fingerprint_of_raw(&b.signer);
    if !expect.authorized.contains(&signer) {
        return Err(TicketError::UnauthorizedSigner {
            signer,
            app: expect.app.clone(),
        });
    }
    let relay = Fingerprint::from(b.relay_key);
    if relay != expect.peer {
        return Err(TicketError::WrongRelay {
            ticket: relay,
            presented: expect.peer,
        });
    }
    if &b.app != expect.app {
        return Err(TicketError::WrongApp {
            ticket: b.app.clone(),
            push: expect.app.clone(),
        });
    }
    if &b.release != expect.release {
        return Err(TicketError::WrongRelease {
            ticket: b.release.clone(),
            push: expect.release.clone(),
        });
    }
    if &b.manifest_digest != expect.manifest_digest {
        return Err(TicketError::WrongManifest {
            release: expect.release.clone(),
        });
    }
    Ok(ticket)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Case {
        client: Identity,
        relay: Identity,
        app: AppName,
        release: ReleaseId,
        digest: Hash,
    }

    fn case() -> Case {
        Case {
            client: Identity::generate("client").unwrap(),
            relay: Identity::generate("relay").unwrap(),
            app: AppName::new("shop").unwrap(),
            release: ReleaseId::new("r1").unwrap(),
            digest: Hash::of(b"manifest"),
        }
    }

    #[test]
    fn raw_key_fingerprint_matches_the_certificate_fingerprint() {
        let c = case();
        let t = sign(
            &c.client,
            &c.app,
            &c.release,
            c.digest,
            c.relay.fingerprint(),
        )
        .unwrap();
        let t = Ticket::decode(&t).unwrap();
        assert_eq!(fingerprint_of_raw(&t.body.signer), c.client.fingerprint());
        assert_eq!(Fingerprint::from(t.body.relay_key), c.relay.fingerprint());
    }

    #[test]
    fn only_a_matching_ticket_from_an_authorized_signer_passes() {
        let c = case();
        let stranger = Identity::generate("stranger").unwrap();
        let good = sign(
            &c.client,
            &c.app,
            &c.release,
            c.digest,
            c.relay.fingerprint(),
        )
        .unwrap();
        let authorized: HashSet<Fingerprint> = [c.client.fingerprint()].into();
        let other_app = AppName::new("blog").unwrap();
        let other_release = ReleaseId::new("r2").unwrap();
        let other_digest = Hash::of(b"other manifest");
        let expect = Expected {
            app: &c.app,
            release: &c.release,
            manifest_digest: &c.digest,
            peer: c.relay.fingerprint(),
            authorized: &authorized,
        };
        let forged = {
            let mut t = Ticket::decode(&good).unwrap();
            // Same body, another release: the signature no longer covers it.
            t.body.release = other_release.clone();
            t.encode()
        };
        let flipped = {
            let mut t = Ticket::decode(&good).unwrap();
            t.signature[10] ^= 1;
            t.encode()
        };
        let by_stranger = sign(
            &stranger,
            &c.app,
            &c.release,
            c.digest,
            c.relay.fingerprint(),
        )
        .unwrap();
        type Check = fn(&TicketError) -> bool;
        let cases: Vec<(&str, Vec<u8>, Expected<'_>, Option<Check>)> = vec![
            ("good", good.clone(), expect, None),
            (
                "forged body",
                forged,
                expect,
                Some(|e| *e == TicketError::BadSignature),
            ),
            (
                "flipped signature bit",
                flipped,
                expect,
                Some(|e| *e == TicketError::BadSignature),
            ),
            (
                "unauthorized signer",
                by_stranger,
                expect,
                Some(|e| matches!(e, TicketError::UnauthorizedSigner { .. })),
            ),
            (
                "presented by another key",
                good.clone(),
                Expected {
                    peer: stranger.fingerprint(),
                    ..expect
                },
                Some(|e| matches!(e, TicketError::WrongRelay { .. })),
            ),
            (
                "another manifest",
                good.clone(),
                Expected {
                    manifest_digest: &other_digest,
                    ..expect
                },
                Some(|e| matches!(e, TicketError::WrongManifest { .. })),
            ),
            (
                "another release",
                good.clone(),
                Expected {
                    release: &other_release,
                    ..expect
                },
                Some(|e| matches!(e, TicketError::WrongRelease { .. })),
            ),
            (
                "another app",
                good.clone(),
                Expected {
                    app: &other_app,
                    ..expect
                },
                Some(|e| matches!(e, TicketError::WrongApp { .. })),
            ),
            (
                "garbage",
                vec![0xFF; 40],
                expect,
                Some(|e| matches!(e, TicketError::Malformed(_))),
            ),
            (
                "empty",
                Vec::new(),
                expect,
                Some(|e| matches!(e, TicketError::Malformed(_))),
            ),
        ];
        for (what, ticket, expect, want) in cases {
            let got = verify(&ticket, &expect);
            match (want, got) {
                (None, Ok(t)) => assert_eq!(t.body.release, c.release, "{what}"),
                (Some(check), Err(e)) => assert!(check(&e), "{what}: {e}"),
                (want, got) => panic!("{what}: expected failure {}, got {got:?}", want.is_some()),
            }
        }
    }
}
