//! Moving interdependent containers together (e.g. web + database): each member runs its own
//! migration (its own connection, pre-copy rounds in parallel with the others), and the members
//! meet twice. Before the freeze: all pre-copies are done, so the final syncs run together and
//! the group's downtime is one member's, not the sum. After the restores, which go in the
//! group's order (a database before the web server that needs it): all members run at the
//! target, or every member goes back to the source (the target drops what it restored).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

/// A group described in a TOML file (`hop migrate --group FILE`):
///
/// ```toml
/// runc_root = "/run/runc"            # optional
/// haproxy = "/run/haproxy/admin.sock" # optional: HAProxy's runtime socket
///
/// [[container]]                      # restored first
/// id = "db"
///
/// [[container]]
/// id = "web"
/// haproxy_server = "be/web"          # this member's clients are held during the move
/// haproxy_addr = "10.200.0.2:8080"   # and sent here afterwards (over the VPN)
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupFile {
    /// runc's state directory for every member.
    pub runc_root: Option<PathBuf>,
    /// HAProxy's runtime socket, for members with a `haproxy_server`.
    pub haproxy: Option<PathBuf>,
    /// The members, in restore order.
    pub container: Vec<Member>,
}

/// One container of a group file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// runc container id.
    pub id: String,
    /// The HAProxy server (`BACKEND/SERVER`) whose clients are this container's.
    pub haproxy_server: Option<String>,
    /// This container's address at the target (`IP:PORT`), for HAProxy.
    pub haproxy_addr: Option<String>,
}

impl GroupFile {
    /// Read and check a group file.
    pub fn load(path: &Path) -> Result<GroupFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read group file {}", path.display()))?;
        GroupFile::parse(&text).with_context(|| format!("group file {}", path.display()))
    }

    /// Parse and check the text of a group file.
    pub fn parse(text: &str) -> Result<GroupFile> {
        let g: GroupFile = toml::from_str(text)?;
        if g.container.is_empty() {
            bail!("no [[container]]");
        }
        let mut seen = std::collections::HashSet::new();
        for m in &g.container {
            if !super::calls::valid_id(&m.id) {
                bail!("bad container id {:?}", m.id);
            }
            if !seen.insert(&m.id) {
                bail!("container {} is listed twice", m.id);
            }
            if m.haproxy_server.is_some() && g.haproxy.is_none() {
                bail!(
                    "container {} has a haproxy_server but the file has no haproxy socket",
                    m.id
                );
            }
            if m.haproxy_addr.is_some() && m.haproxy_server.is_none() {
                bail!("container {}: haproxy_addr needs haproxy_server", m.id);
            }
        }
        Ok(g)
    }
}

/// Where the members meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meeting {
    /// Pre-copy done.
    PreCopied = 0,
    /// Clients held and the requests in flight finished, about to freeze: no member freezes
    /// while another still drains requests that may need it (a web server's requests wait on
    /// its database).
    Held = 1,
    /// Restore attempted.
    Restored = 2,
}

#[derive(Debug, Default)]
struct State {
    arrived: [usize; 3],
    failed: [bool; 3],
    /// Member i has made its restore attempt (or will not make one).
    finished: Vec<bool>,
}

/// The meeting points of a group of `n` members.
#[derive(Debug)]
pub struct Group {
    n: usize,
    state: Mutex<State>,
    cv: Condvar,
}

impl Group {
    /// A group of `n` members.
    pub fn new(n: usize) -> Group {
        Group {
            n,
            state: Mutex::new(State {
                finished: vec![false; n],
                ..State::default()
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arrive at `m` (`ok`: this member got there without failing) and wait for the others;
    /// true when every member arrived without failing, false as soon as one failed.
    pub fn meet(&self, m: Meeting, ok: bool) -> bool {
        let k = m as usize;
        let mut s = self.lock();
        s.arrived[k] += 1;
        if !ok {
            s.failed[k] = true;
        }
        self.cv.notify_all();
        while s.arrived[k] < self.n && !s.failed[k] {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        !s.failed[k]
    }

    /// Wait until every member before `i` has made its restore attempt.
    pub fn wait_turn(&self, i: usize) {
        let mut s = self.lock();
        while !s.finished[..i].iter().all(|f| *f) {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Member `i` has made its restore attempt, or gave up before it.
    pub fn finish_turn(&self, i: usize) {
        let mut s = self.lock();
        if let Some(f) = s.finished.get_mut(i) {
            *f = true;
        }
        self.cv.notify_all();
    }

    /// Member `i` failed after passing the first `passed` meetings: it tells the meetings still
    /// ahead of it, so that nobody waits for it.
    pub fn leave(&self, i: usize, passed: usize) {
        match passed {
            0 => {
                self.meet(Meeting::PreCopied, false);
            }
            1 => {
                self.meet(Meeting::Held, false);
            }
            2 => {
                self.finish_turn(i);
                self.meet(Meeting::Restored, false);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_files_are_checked() {
        let g = GroupFile::parse(
            "haproxy = \"/run/h.sock\"\n[[container]]\nid = \"db\"\n[[container]]\nid = \"web\"\n\
             haproxy_server = \"be/web\"\nhaproxy_addr = \"10.200.0.2:8080\"\n",
        )
        .unwrap();
        assert_eq!(g.container.len(), 2);
        assert_eq!(g.container[1].haproxy_server.as_deref(), Some("be/web"));
        for (bad, why) in [
            ("", "missing field"),
            ("container = []", "no [[container]]"),
            (
                "[[container]]\nid = \"a\"\n[[container]]\nid = \"a\"",
                "twice",
            ),
            ("[[container]]\nid = \"../x\"", "bad container id"),
            (
                "[[container]]\nid = \"a\"\nhaproxy_server = \"be/a\"",
                "no haproxy socket",
            ),
            ("[[container]]\nid = \"a\"\nport = 1", "unknown field"),
        ] {
            let err = format!("{:#}", GroupFile::parse(bad).unwrap_err());
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
    use std::sync::Arc;

    #[test]
    fn members_meet_and_one_failure_releases_the_others() {
        let g = Arc::new(Group::new(3));
        let hs: Vec<_> = (0..3)
            .map(|i| {
                let g = g.clone();
                std::thread::spawn(move || g.meet(Meeting::PreCopied, i != 1))
            })
            .collect();
        let got: Vec<bool> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(got, vec![false, false, false]);

        let g = Arc::new(Group::new(2));
        let g2 = g.clone();
        let h = std::thread::spawn(move || g2.meet(Meeting::PreCopied, true));
        assert!(g.meet(Meeting::PreCopied, true));
        assert!(h.join().unwrap());
    }

    #[test]
    fn a_member_whose_hold_failed_stops_the_others_before_their_freeze() {
        let g = Arc::new(Group::new(2));
        let g2 = g.clone();
        let h = std::thread::spawn(move || {
            g2.meet(Meeting::PreCopied, true) && g2.meet(Meeting::Held, true)
        });
        assert!(g.meet(Meeting::PreCopied, true));
        // Its clients could not be held: it leaves after the first meeting.
        g.leave(0, 1);
        assert!(!h.join().unwrap(), "the other member must not freeze");
    }

    #[test]
    fn restores_go_in_order_and_a_member_that_gives_up_frees_its_turn() {
        let g = Arc::new(Group::new(3));
        let order = Arc::new(Mutex::new(Vec::new()));
        let hs: Vec<_> = (0..3)
            .rev()
            .map(|i| {
                let (g, order) = (g.clone(), order.clone());
                std::thread::spawn(move || {
                    if i == 1 {
                        // Fails before its restore, after both meetings before the freeze.
                        g.leave(1, 2);
                        return false;
                    }
                    g.wait_turn(i);
                    order.lock().unwrap().push(i);
                    g.finish_turn(i);
                    g.meet(Meeting::Restored, true)
                })
            })
            .collect();
        let ok: Vec<bool> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(*order.lock().unwrap(), vec![0, 2]);
        assert!(ok.iter().all(|o| !o), "a member failed: nobody commits");
    }
}
