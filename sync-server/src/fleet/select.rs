//! Which hosts a fleet command addresses, and the settings that apply to them.
//!
//! `--group G` (repeatable) picks groups, all of them when none is named; `--hosts h1,h2` then
//! keeps only the named hosts, each of which must be in a picked group (the group says which app
//! to push to). Hosts keep the order of their groups' lists, which is the order they go into
//! waves. A host in two picked groups with the same app is addressed once, for the first group;
//! with different apps it is addressed once per app. When the picked groups disagree on
//! `waves` or `max_failed`, the command line must decide: a silent pick of one group's value
//! could activate more hosts at once than the other group allows.

use std::collections::HashSet;

use sync_core::wire::AppName;

use super::inventory::{FleetHost, Inventory};
use super::wave::{MaxFailed, Waves};
use crate::client::Target;

/// Why a selection could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectionError {
    #[error("{file}: no group {name:?}; the groups are {known}")]
    UnknownGroup {
        file: String,
        name: String,
        known: String,
    },
    #[error("{file}: no host {name:?}; declare it as [hosts.{name}]")]
    UnknownHost { file: String, name: String },
    #[error("{file}: host {name} is not in group {groups}; add it to one, or pick its group with --group")]
    NotInGroups {
        file: String,
        name: String,
        groups: String,
    },
    #[error("{file}: groups {groups} set different {setting}; pass --{flag} to choose")]
    Conflict {
        file: String,
        setting: &'static str,
        flag: &'static str,
        /// The two groups that differ, with their values.
        groups: String,
    },
}

/// One host to address, for one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    pub host: FleetHost,
    /// The group it was picked through.
    pub group: String,
    pub app: AppName,
    pub target: Target,
}

/// Rollout settings for a selection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    pub waves: Waves,
    pub max_failed: MaxFailed,
}

/// The hosts a command addresses, in wave order, and the settings for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub hosts: Vec<Selected>,
    pub settings: Settings,
}

/// Picks hosts from `inv`: `groups` (all when empty), narrowed to `hosts` (all when empty).
/// `waves` and `max_failed` given on the command line override the groups' settings.
pub fn select(
    inv: &Inventory,
    groups: &[String],
    hosts: &[String],
    waves: Option<Waves>,
    max_failed: Option<MaxFailed>,
) -> Result<Selection, SelectionError> {
    let file = inv.path().display().to_string();
    let picked: Vec<_> = if groups.is_empty() {
        inv.groups().collect()
    } else {
        let mut seen = HashSet::new();
        groups
            .iter()
            .filter(|g| seen.insert(g.as_str()))
            .map(|g| {
                inv.group(g).ok_or_else(|| SelectionError::UnknownGroup {
                    file: file.clone(),
                    name: g.clone(),
                    known: inv
                        .groups()
                        .map(|g| g.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            })
            .collect::<Result<_, _>>()?
    };
    let only: Option<HashSet<&str>> = if hosts.is_empty() {
        None
    } else {
        for h in hosts {
            if inv.host(h).is_none() {
                return Err(SelectionError::UnknownHost {
                    file: file.clone(),
                    name: h.clone(),
                });
            }
            if !picked.iter().any(|g| g.hosts.contains(h)) {
                let names: Vec<&str> = picked.iter().map(|g| g.name.as_str()).collect();
                return Err(SelectionError::NotInGroups {
                    file: file.clone(),
                    name: h.clone(),
                    groups: names.join(" or "),
                });
            }
        }
        Some(hosts.iter().map(String::as_str).collect())
    };
    let mut out = Vec::new();
    let mut seen_targets = HashSet::new();
    let mut contributing = Vec::new();
    for g in &picked {
        let mut any = false;
        for name in &g.hosts {
            if only.as_ref().is_some_and(|o| !o.contains(name.as_str())) {
                continue;
            }
            let host = inv.host(name).expect("groups name declared hosts");
            let target = host.target(&g.app);
            if !seen_targets.insert(target.clone()) {
                continue;
            }
            any = true;
            out.push(Selected {
                host: host.clone(),
                group: g.name.clone(),
                app: g.app.clone(),
                target,
            });
        }
        if any {
            contributing.push(*g);
        }
    }
    let waves = match waves {
        Some(w) => w,
        None => agree(&file, &contributing, "waves", "waves", |g| {
            g.waves.clone().unwrap_or_default()
        })?,
    };
    let max_failed = match max_failed {
        Some(m) => m,
        None => agree(&file, &contributing, "max_failed", "max-failed", |g| {
            g.max_failed.unwrap_or_default()
        })?,
    };
    Ok(Selection {
        hosts: out,
        settings: Settings { waves, max_failed },
    })
}

/// The value every group in `groups` has for a setting, or a conflict naming two that differ.
fn agree<T: PartialEq + std::fmt::Display + Default>(
    file: &str,
    groups: &[&super::inventory::Group],
    setting: &'static str,
    flag: &'static str,
    value: impl Fn(&super::inventory::Group) -> T,
) -> Result<T, SelectionError> {
    let Some(first) = groups.first() else {
        return Ok(T::default());
    };
    let v = value(first);
    for g in &groups[1..] {
        let other = value(g);
        if other != v {
            return Err(SelectionError::Conflict {
                file: file.to_owned(),
                setting,
                flag,
                groups: format!("{} ({v}) and {} ({other})", first.name, g.name),
            });
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const FP: &str = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";

    fn inventory(extra: &str) -> Inventory {
        let mut text = String::new();
        for i in 1..=5 {
            text += &format!("[hosts.h{i}]\naddress = \"10.0.0.{i}\"\nkey = \"{FP}\"\n");
        }
        text += "[groups.web]\nhosts = [\"h3\", \"h1\", \"h2\"]\napp = \"shop\"\n";
        text += "[groups.api]\nhosts = [\"h4\", \"h1\"]\napp = \"shop\"\n";
        text += "[groups.admin]\nhosts = [\"h1\", \"h5\"]\napp = \"admin\"\nwaves = \"100%\"\nmax_failed = 1\n";
        text += extra;
        Inventory::parse(&text, Path::new("f.toml")).unwrap()
    }

    fn names(s: &Selection) -> Vec<String> {
        s.hosts
            .iter()
            .map(|h| format!("{}/{}", h.host.name, h.app))
            .collect()
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn selections_follow_group_order_and_address_each_target_once() {
        let inv = inventory("");
        let table: &[(&[&str], &[&str], &[&str])] = &[
            (&["web"], &[], &["h3/shop", "h1/shop", "h2/shop"]),
            (
                &["web", "api"],
                &[],
                &["h3/shop", "h1/shop", "h2/shop", "h4/shop"],
            ),
            (
                &["api", "web"],
                &[],
                &["h4/shop", "h1/shop", "h3/shop", "h2/shop"],
            ),
            (&["web", "web"], &[], &["h3/shop", "h1/shop", "h2/shop"]),
            (&["web"], &["h2", "h3"], &["h3/shop", "h2/shop"]),
            (&["web", "api"], &["h4"], &["h4/shop"]),
            (&["web", "admin"], &["h1"], &["h1/shop", "h1/admin"]),
            // No group named: every group, in name order.
            (&[], &["h1"], &["h1/admin", "h1/shop"]),
        ];
        for (groups, hosts, want) in table {
            let s = select(
                &inv,
                &strs(groups),
                &strs(hosts),
                Some(Waves::default()),
                Some(MaxFailed::None),
            )
            .unwrap_or_else(|e| panic!("{groups:?} {hosts:?}: {e}"));
            assert_eq!(names(&s), strs(want), "{groups:?} {hosts:?}");
        }
        let s = select(&inv, &strs(&["web"]), &[], None, None).unwrap();
        assert_eq!(s.hosts[0].target.to_string(), "10.0.0.3:7171/shop");
        assert_eq!(s.hosts[0].group, "web");
    }

    #[test]
    fn settings_come_from_the_groups_unless_they_disagree() {
        let inv = inventory("");
        let s = select(&inv, &strs(&["admin"]), &[], None, None).unwrap();
        assert_eq!(s.settings.waves, Waves::all_at_once());
        assert_eq!(s.settings.max_failed, MaxFailed::Hosts(1));
        let s = select(&inv, &strs(&["web", "api"]), &[], None, None).unwrap();
        assert_eq!(s.settings, Settings::default());
        // Only groups that contribute a host count.
        let s = select(&inv, &strs(&["web", "admin"]), &strs(&["h2"]), None, None).unwrap();
        assert_eq!(s.settings, Settings::default());

        let e = select(&inv, &strs(&["web", "admin"]), &[], None, None).unwrap_err();
        assert!(e.to_string().contains("--waves"), "{e}");
        let w: Waves = "2".parse().unwrap();
        let e = select(&inv, &strs(&["web", "admin"]), &[], Some(w.clone()), None).unwrap_err();
        assert!(e.to_string().contains("--max-failed"), "{e}");
        let s = select(
            &inv,
            &strs(&["web", "admin"]),
            &[],
            Some(w.clone()),
            Some(MaxFailed::Percent(10)),
        )
        .unwrap();
        assert_eq!(s.settings.waves, w);
        assert_eq!(s.settings.max_failed, MaxFailed::Percent(10));
    }

    #[test]
    fn bad_selections_say_what_to_do() {
        let inv = inventory("");
        let table: &[(&[&str], &[&str], &str)] = &[
            (
                &["db"],
                &[],
                "no group \"db\"; the groups are admin, api, web",
            ),
            (&["web"], &["h9"], "no host \"h9\""),
            (&["web"], &["h5"], "host h5 is not in group web"),
            (&["web", "api"], &["h5"], "not in group web or api"),
        ];
        for (groups, hosts, want) in table {
            let e = select(&inv, &strs(groups), &strs(hosts), None, None).unwrap_err();
            assert!(e.to_string().contains(want), "{groups:?} {hosts:?}: {e}");
            assert!(e.to_string().contains("f.toml"), "{e}");
        }
    }
}
