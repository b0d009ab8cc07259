//! Relayed pushes as data: the subtree a daemon forwards a release to ([`RelayPlan`]), what it
//! reports back about each node of it ([`Relayed`]), and the [`Ticket`] that lets a relay push.
//!
//! A fleet push can hand a release to a few daemons and let each forward it to its children. A
//! child does not know the relay's key, so the relay presents a ticket: the originating client
//! signs (app, release, manifest digest, relay key) with its own key, which the child does know
//! (`apps.NAME.authorized_keys`). This module only encodes, decodes and checks the shape of those
//! values; signing and verifying are the network edge's (`sync-server`), which holds the keys.
//!
//! Everything here arrives from a peer, so decoding is bounded and the plan is flat (nodes name
//! their parent by index, parents first): no recursion a hostile peer could make deep.

use serde::{Deserialize, Serialize};

use crate::manifest::Hash;
use crate::release::ReleaseId;
use crate::wire::AppName;

/// Most nodes one relay plan may name (a 1,000-host fleet needs far fewer).
pub const MAX_RELAY_NODES: usize = 16_384;
/// Longest `HOST:PORT` of a relay node.
pub const MAX_HOST_LEN: usize = 300;
/// Longest encoded ticket.
pub const MAX_TICKET_LEN: usize = 512;
/// Longest failure message one node report may carry.
pub const MAX_REPORT_MESSAGE: usize = 1_000;

/// What a ticket's signature covers is prefixed with this, so a signature made for anything else
/// can never pass as a ticket's.
const TICKET_CONTEXT: &[u8] = b"relsync relay ticket v1\0";

/// Why a relay plan or a ticket is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    #[error(
        "relay plan names {0} nodes, more than the {MAX_RELAY_NODES} allowed; split the fleet"
    )]
    TooManyNodes(usize),
    #[error("relay node {index}: parent {parent} does not come before it; the plan must list parents first")]
    BadParent { index: usize, parent: u32 },
    #[error("relay node {index}: host {host:?} is empty or longer than {MAX_HOST_LEN} bytes")]
    BadHost { index: usize, host: String },
    #[error("relay node {index}: its ticket is longer than {MAX_TICKET_LEN} bytes")]
    TicketTooLong { index: usize },
    #[error("relay node {index} carries no ticket, so its parent could not push to it; the plan is malformed")]
    MissingTicket { index: usize },
    #[error("relay ticket of {len} bytes is longer than the {MAX_TICKET_LEN} allowed")]
    TicketLength { len: usize },
    #[error("relay ticket cannot be decoded: {0}")]
    TicketDecode(String),
    #[error("relay ticket carries a signature of {0} bytes; an Ed25519 signature has 64")]
    SignatureLength(usize),
}

/// One daemon a relay forwards the release to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayNode {
    /// `HOST:PORT` of its relsyncd.
    pub host: String,
    /// SHA-256 fingerprint of its key, which the relay pins.
    pub key: [u8; 32],
    /// Index of its parent in the plan; `None`: a child of the daemon receiving the plan.
    pub parent: Option<u32>,
    /// The encoded [`Ticket`] naming its parent's key: what its parent presents to it.
    #[serde(with = "crate::wire::bytes")]
    pub ticket: Vec<u8>,
}

/// The part of a relay tree below the daemon that receives it, flat and parents first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayPlan {
    /// The encoded [`Ticket`] authorizing this push when a relay sends it; empty when the
    /// originating client sends it itself.
    #[serde(with = "crate::wire::bytes")]
    pub ticket: Vec<u8>,
    pub nodes: Vec<RelayNode>,
}

impl RelayPlan {
    /// Checks the bounds and that every parent comes before its children.
    pub fn validate(&self) -> Result<(), RelayError> {
        if self.nodes.len() > MAX_RELAY_NODES {
            return Err(RelayError::TooManyNodes(self.nodes.len()));
        }
        if self.ticket.len() > MAX_TICKET_LEN {
            return Err(RelayError::TicketLength {
                len: self.ticket.len(),
            });
        }
        for (index, n) in self.nodes.iter().enumerate() {
            if let Some(parent) = n.parent {
                if parent as usize >= index {
                    return Err(RelayError::BadParent { index, parent });
                }
            }
            if n.host.is_empty() || n.host.len() > MAX_HOST_LEN {
                return Err(RelayError::BadHost {
                    index,
                    host: n.host.chars().take(MAX_HOST_LEN).collect(),
                });
            }
            if n.ticket.len() > MAX_TICKET_LEN {
                return Err(RelayError::TicketTooLong { index });
            }
            if n.ticket.is_empty() {
                return Err(RelayError::MissingTicket { index });
            }
        }
        Ok(())
    }

    /// The nodes the receiving daemon pushes to itself.
    pub fn children(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].parent.is_none())
            .collect()
    }

    /// The plan to send along with the push to `child` (a node of [`RelayPlan::children`]): its
    /// ticket and its own subtree, renumbered. The second value maps each node of the new plan
    /// to its index here, to translate the child's reports back. Expects a validated plan.
    pub fn subtree(&self, child: usize) -> (RelayPlan, Vec<usize>) {
        // Parents come first, so one pass finds every descendant after its parent.
        let mut new_index: Vec<Option<u32>> = vec![None; self.nodes.len()];
        let mut inside = vec![false; self.nodes.len()];
        if child < self.nodes.len() {
            inside[child] = true;
        }
        let mut map = Vec::new();
        let mut nodes = Vec::new();
        for i in child.saturating_add(1)..self.nodes.len() {
            let Some(p) = self.nodes[i].parent.map(|p| p as usize) else {
                continue;
            };
            if !inside.get(p).copied().unwrap_or(false) {
                continue;
            }
            inside[i] = true;
            new_index[i] = Some(u32::try_from(nodes.len()).unwrap_or(u32::MAX));
            let parent = if p == child { None } else { new_index[p] };
            nodes.push(RelayNode {
                parent,
                ..self.nodes[i].clone()
            });
            map.push(i);
        }
        let ticket = self
            .nodes
            .get(child)
            .map(|n| n.ticket.clone())
            .unwrap_or_default();
        (RelayPlan { ticket, nodes }, map)
    }
}

/// What a relay reports about one node of its plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relayed {
    /// Index of the node in the plan the relay received.
    pub node: u32,
    /// `None`: the node staged the release; otherwise why it did not.
    pub error: Option<String>,
    /// For a node that staged: the release it ran before the push (its `Staged::previous`).
    pub previous: Option<ReleaseId>,
}

impl Relayed {
    /// The report of a node that staged the release, having run `previous` before.
    pub fn staged(node: u32, previous: Option<ReleaseId>) -> Relayed {
        Relayed {
            node,
            error: None,
            previous,
        }
    }

    /// A report whose message is cut to [`MAX_REPORT_MESSAGE`] bytes (at a character boundary).
    pub fn new(node: u32, error: Option<String>) -> Relayed {
        let error = error.map(|mut m| {
            if m.len() > MAX_REPORT_MESSAGE {
                let mut end = MAX_REPORT_MESSAGE;
                while !m.is_char_boundary(end) {
                    end -= 1;
                }
                m.truncate(end);
            }
            m
        });
        Relayed {
            node,
            error,
            previous: None,
        }
    }
}

/// What the originating client signs: a relay with key `relay_key` may push release `release`
/// (whose manifest encoding has digest `manifest_digest`) of app `app`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketBody {
    pub app: AppName,
    pub release: ReleaseId,
    pub manifest_digest: Hash,
    /// SHA-256 fingerprint of the relay's key, which must be the key it connects with.
    pub relay_key: [u8; 32],
    /// The signer's raw Ed25519 public key; its fingerprint must be authorized for `app`.
    pub signer: [u8; 32],
}

/// A signed [`TicketBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub body: TicketBody,
    #[serde(with = "crate::wire::bytes")]
    pub signature: Vec<u8>,
}

impl TicketBody {
    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        postcard::to_extend(self, TICKET_CONTEXT.to_vec())
            .expect("serializing owned data to a Vec cannot fail")
    }
}

impl Ticket {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("serializing owned data to a Vec cannot fail")
    }

    /// Decodes a ticket a peer sent; bounded by [`MAX_TICKET_LEN`], trailing bytes refused.
    pub fn decode(data: &[u8]) -> Result<Ticket, RelayError> {
        if data.len() > MAX_TICKET_LEN {
            return Err(RelayError::TicketLength { len: data.len() });
        }
        let (ticket, rest) = postcard::take_from_bytes::<Ticket>(data)
            .map_err(|e| RelayError::TicketDecode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(RelayError::TicketDecode(format!(
                "{} bytes follow the ticket",
                rest.len()
            )));
        }
        if ticket.signature.len() != 64 {
            return Err(RelayError::SignatureLength(ticket.signature.len()));
        }
        Ok(ticket)
    }
}

/// Entry points for the fuzz targets (and the corpus replay in `cargo test`).
pub mod fuzz {
    use super::{RelayPlan, Ticket};

    /// Decodes a ticket; any input must give a value or a typed error.
    pub fn ticket_decode_one(data: &[u8]) {
        if let Ok(t) = Ticket::decode(data) {
            let again = Ticket::decode(&t.encode()).expect("a decoded ticket re-encodes");
            assert_eq!(again, t);
            let _ = t.body.signed_bytes();
        }
        // The same bytes as a relay plan: validated, then split into subtrees.
        if let Ok((plan, _)) = postcard::take_from_bytes::<RelayPlan>(data) {
            if plan.validate().is_ok() {
                for c in plan.children() {
                    let (sub, map) = plan.subtree(c);
                    assert_eq!(sub.nodes.len(), map.len());
                    assert_eq!(sub.validate(), Ok(()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(parent: Option<u32>, host: &str) -> RelayNode {
        RelayNode {
            host: host.into(),
            key: [7; 32],
            parent,
            ticket: host.as_bytes().to_vec(),
        }
    }

    fn ticket() -> Ticket {
        Ticket {
            body: TicketBody {
                app: AppName::new("shop").unwrap(),
                release: ReleaseId::new("r1").unwrap(),
                manifest_digest: Hash::of(b"manifest"),
                relay_key: [1; 32],
                signer: [2; 32],
            },
            signature: vec![3; 64],
        }
    }

    #[test]
    fn subtree_renumbers_descendants_and_keeps_the_child_ticket() {
        // a(0) -> c(2), d(3) ; b(1) -> e(4) ; c(2) -> f(5)
        let plan = RelayPlan {
            ticket: Vec::new(),
            nodes: vec![
                node(None, "a"),
                node(None, "b"),
                node(Some(0), "c"),
                node(Some(0), "d"),
                node(Some(1), "e"),
                node(Some(2), "f"),
            ],
        };
        plan.validate().unwrap();
        assert_eq!(plan.children(), [0, 1]);
        // (child, hosts of its subtree, their parents, their indices in the full plan)
        type Row = (
            usize,
            &'static [&'static str],
            &'static [Option<u32>],
            &'static [usize],
        );
        let cases: &[Row] = &[
            (0, &["c", "d", "f"], &[None, None, Some(0)], &[2, 3, 5]),
            (1, &["e"], &[None], &[4]),
            (5, &[], &[], &[]),
        ];
        for &(child, hosts, parents, map) in cases {
            let (sub, m) = plan.subtree(child);
            let got: Vec<&str> = sub.nodes.iter().map(|n| n.host.as_str()).collect();
            assert_eq!(got, hosts, "child {child}");
            let got: Vec<Option<u32>> = sub.nodes.iter().map(|n| n.parent).collect();
            assert_eq!(got, parents, "child {child}");
            assert_eq!(m, map, "child {child}");
            assert_eq!(sub.ticket, plan.nodes[child].ticket, "child {child}");
            sub.validate().unwrap();
        }
    }

    #[test]
    fn validate_refuses_bad_plans() {
        let ok = || RelayPlan {
            ticket: Vec::new(),
            nodes: vec![node(None, "a"), node(Some(0), "b")],
        };
        type Change = Box<dyn Fn(&mut RelayPlan)>;
        let cases: Vec<(&str, Change, RelayError)> = vec![
            (
                "parent after child",
                Box::new(|p| p.nodes[1].parent = Some(1)),
                RelayError::BadParent {
                    index: 1,
                    parent: 1,
                },
            ),
            (
                "empty host",
                Box::new(|p| p.nodes[0].host.clear()),
                RelayError::BadHost {
                    index: 0,
                    host: String::new(),
                },
            ),
            (
                "long ticket",
                Box::new(|p| p.nodes[1].ticket = vec![0; MAX_TICKET_LEN + 1]),
                RelayError::TicketTooLong { index: 1 },
            ),
            (
                "no ticket",
                Box::new(|p| p.nodes[1].ticket.clear()),
                RelayError::MissingTicket { index: 1 },
            ),
            (
                "long own ticket",
                Box::new(|p| p.ticket = vec![0; MAX_TICKET_LEN + 1]),
                RelayError::TicketLength {
                    len: MAX_TICKET_LEN + 1,
                },
            ),
        ];
        for (what, change, want) in cases {
            let mut p = ok();
            p.validate().unwrap();
            change(&mut p);
            assert_eq!(p.validate(), Err(want), "{what}");
        }
        let big = RelayPlan {
            ticket: Vec::new(),
            nodes: vec![node(None, "a"); MAX_RELAY_NODES + 1],
        };
        assert_eq!(
            big.validate(),
            Err(RelayError::TooManyNodes(MAX_RELAY_NODES + 1))
        );
    }

    #[test]
    fn ticket_round_trips_and_refuses_bad_encodings() {
        let t = ticket();
        let enc = t.encode();
        assert_eq!(Ticket::decode(&enc).unwrap(), t);
        let mut trailing = enc.clone();
        trailing.push(0);
        assert!(matches!(
            Ticket::decode(&trailing),
            Err(RelayError::TicketDecode(_))
        ));
        assert!(matches!(
            Ticket::decode(&enc[..enc.len() - 1]),
            Err(RelayError::TicketDecode(_))
        ));
        let short = Ticket {
            signature: vec![0; 63],
            ..t.clone()
        };
        assert_eq!(
            Ticket::decode(&short.encode()),
            Err(RelayError::SignatureLength(63))
        );
        assert_eq!(
            Ticket::decode(&vec![0; MAX_TICKET_LEN + 1]),
            Err(RelayError::TicketLength {
                len: MAX_TICKET_LEN + 1
            })
        );
        // The signed bytes change with every field, and never equal the bare encoding.
        let base = t.body.signed_bytes();
        assert!(base.starts_with(TICKET_CONTEXT));
        let mut other = t.body.clone();
        other.relay_key[0] ^= 1;
        assert_ne!(other.signed_bytes(), base);
        let mut other = t.body.clone();
        other.manifest_digest = Hash::of(b"other");
        assert_ne!(other.signed_bytes(), base);
    }

    #[test]
    fn reports_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_REPORT_MESSAGE);
        let r = Relayed::new(3, Some(long));
        let m = r.error.unwrap();
        assert!(m.len() <= MAX_REPORT_MESSAGE && m.len() >= MAX_REPORT_MESSAGE - 1);
        assert_eq!(Relayed::new(1, None).error, None);
    }
}
