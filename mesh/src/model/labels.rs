//! Label sets and selectors.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::ser::SerializeMap;

use super::Interner;

/// A workload's labels: sorted pairs of interned strings, compact and cheap to compare.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(Box<[(Arc<str>, Arc<str>)]>);

impl Labels {
    pub(crate) fn new<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
        interner: &mut Interner,
    ) -> Self {
        let mut v: Vec<(Arc<str>, Arc<str>)> = pairs
            .into_iter()
            .map(|(k, v)| (interner.get(k), interner.get(v)))
            .collect();
        v.sort();
        v.dedup_by(|a, b| a.0 == b.0);
        Labels(v.into_boxed_slice())
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    /// Whether every `key: value` of `selector` is present. An empty selector matches everything.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector
            .iter()
            .all(|(k, v)| self.get(k) == Some(v.as_str()))
    }

    /// Iterates the pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }
}

impl serde::Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// Whether `labels` satisfy a Kubernetes equality selector.
pub(crate) fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_and_selectors() {
        let mut i = Interner::default();
        let labels = Labels::new([("version", "v1"), ("app", "reviews")], &mut i);
        assert_eq!(labels.get("app"), Some("reviews"));
        assert_eq!(labels.get("missing"), None);
        let sel = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(labels.matches(&sel(&[])));
        assert!(labels.matches(&sel(&[("app", "reviews")])));
        assert!(labels.matches(&sel(&[("app", "reviews"), ("version", "v1")])));
        assert!(!labels.matches(&sel(&[("app", "reviews"), ("version", "v2")])));
        assert!(!labels.matches(&sel(&[("tier", "web")])));
    }
}
