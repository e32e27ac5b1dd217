//! Include/exclude rules with rsync's pattern habits.
//!
//! Rules are tried in order; the first whose pattern matches decides (include or exclude);
//! a path no rule matches is included. Patterns follow rsync:
//! - a pattern without `/` (other than a trailing one) matches the last component of a path
//!   at any depth (`*.o`, `.git`);
//! - a pattern starting with `/` is anchored at the root of the transfer (`/build`);
//! - any other pattern with a `/` matches the end of the path (`src/*.rs` matches
//!   `a/src/x.rs`);
//! - a trailing `/` matches directories only (`cache/`);
//! - `*` does not cross `/`, `**` does, `?` and `[...]` as usual.
//!
//! An excluded directory is not descended into. On the receiving side, excluded paths are
//! protected from `--delete`, as with rsync.

use crate::error::{Error, Result};
use crate::path::RelPath;
use globset::{GlobBuilder, GlobMatcher};
use serde::{Deserialize, Serialize};

/// One rule as the user wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Include (`true`) or exclude (`false`) what matches.
    pub include: bool,
    /// The pattern.
    pub pattern: String,
}

#[derive(Debug)]
struct Compiled {
    include: bool,
    dir_only: bool,
    matcher: GlobMatcher,
}

/// Compiled rules.
#[derive(Debug, Default)]
pub struct Rules {
    rules: Vec<Compiled>,
}

impl Rules {
    /// Compile `rules`; a malformed pattern is an error naming it.
    pub fn new(rules: &[Rule]) -> Result<Rules> {
        let mut out = Vec::with_capacity(rules.len());
        for r in rules {
            let mut p = r.pattern.as_str();
            let dir_only = p.len() > 1 && p.ends_with('/');
            if dir_only {
                p = &p[..p.len() - 1];
            }
            let glob = if let Some(anchored) = p.strip_prefix('/') {
                anchored.to_string()
            } else {
                format!("**/{p}")
            };
            let matcher = GlobBuilder::new(&glob)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| Error::Filter(format!("pattern {:?}: {e}", r.pattern)))?
                .compile_matcher();
            out.push(Compiled {
                include: r.include,
                dir_only,
                matcher,
            });
        }
        Ok(Rules { rules: out })
    }

    /// True when there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `path` (a directory if `is_dir`) is excluded by the first rule that matches it.
    pub fn excluded(&self, path: &RelPath, is_dir: bool) -> bool {
        if path.is_root() {
            return false;
        }
        let text = String::from_utf8_lossy(path.as_bytes());
        for r in &self.rules {
            if r.dir_only && !is_dir {
                continue;
            }
            if r.matcher.is_match(text.as_ref()) {
                return !r.include;
            }
        }
        false
    }

    /// Whether `path` or one of its ancestors is excluded (ancestors are directories).
    pub fn excluded_or_under(&self, path: &RelPath, is_dir: bool) -> bool {
        if self.rules.is_empty() {
            return false;
        }
        let mut p = path.parent();
        while !p.is_root() {
            if self.excluded(&p, true) {
                return true;
            }
            p = p.parent();
        }
        self.excluded(path, is_dir)
    }
}

/// Read rules from an `--exclude-from` file: one pattern per line, blank lines and lines
/// starting with `#` or `;` ignored; `+ PATTERN` includes and `- PATTERN` excludes, as in
/// rsync's filter files.
pub fn read_rules_file(path: &std::path::Path, include: bool) -> Result<Vec<Rule>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Filter(format!("cannot read {}: {e}", path.display())))?;
    Ok(text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .map(|l| {
            if let Some(p) = l.strip_prefix("+ ") {
                Rule {
                    include: true,
                    pattern: p.to_string(),
                }
            } else if let Some(p) = l.strip_prefix("- ") {
                Rule {
                    include: false,
                    pattern: p.to_string(),
                }
            } else {
                Rule {
                    include,
                    pattern: l.to_string(),
                }
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes().to_vec()).unwrap()
    }

    fn rules(spec: &[(bool, &str)]) -> Rules {
        Rules::new(
            &spec
                .iter()
                .map(|&(include, pattern)| Rule {
                    include,
                    pattern: pattern.into(),
                })
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn rsync_pattern_habits() {
        let r = rules(&[
            (false, "*.o"),
            (false, "/build"),
            (false, "cache/"),
            (false, "src/*.tmp"),
        ]);
        assert!(r.excluded(&p("a.o"), false));
        assert!(r.excluded(&p("deep/er/a.o"), false));
        assert!(!r.excluded(&p("a.c"), false));
        assert!(r.excluded(&p("build"), true));
        assert!(
            !r.excluded(&p("x/build"), true),
            "anchored patterns match at the root only"
        );
        assert!(r.excluded(&p("x/cache"), true));
        assert!(
            !r.excluded(&p("x/cache"), false),
            "a trailing / matches directories only"
        );
        assert!(r.excluded(&p("a/src/x.tmp"), false));
        assert!(
            !r.excluded(&p("a/src/sub/x.tmp"), false),
            "* does not cross /"
        );
        assert!(r.excluded_or_under(&p("build/out/a.c"), false));
    }

    #[test]
    fn first_match_wins() {
        let r = rules(&[(true, "*.c"), (false, "*")]);
        assert!(!r.excluded(&p("d/a.c"), false));
        assert!(r.excluded(&p("d/a.h"), false));
        assert!(Rules::new(&[Rule {
            include: false,
            pattern: "[".into()
        }])
        .is_err());
    }

    #[test]
    fn rules_files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("ex");
        std::fs::write(&f, "# comment\n*.log\n\n+ keep.log\n- /tmp\n").unwrap();
        let r = read_rules_file(&f, false).unwrap();
        assert_eq!(r.len(), 3);
        assert!(!r[0].include && r[1].include && !r[2].include);
        assert_eq!(r[2].pattern, "/tmp");
    }
}
