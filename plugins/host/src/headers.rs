//! Header maps as plugins see them, and the ABI's pairs encoding.
//!
//! Plugins see HTTP/2-style maps: lower-case names, pseudo-headers (`:method`, `:path`,
//! `:authority`, `:scheme`, `:status`) first, repeated names as separate pairs. The embedder
//! converts its request or response into a [`Headers`] once per phase, every plugin of the chain
//! works on it, and the embedder applies it back only if [`Headers::is_modified`].

/// A header map in wire order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    pairs: Vec<(String, Vec<u8>)>,
    modified: bool,
}

impl Headers {
    /// An empty map.
    pub fn new() -> Headers {
        Headers::default()
    }

    /// Appends a pair without marking the map modified: for building it from a request.
    pub fn push(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        self.pairs.push((name.to_ascii_lowercase(), value.into()));
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.pairs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of `name` as text, if it is UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Adds a value, keeping existing ones.
    pub fn add(&mut self, name: &str, value: &[u8]) {
        self.modified = true;
        self.pairs.push((name.to_ascii_lowercase(), value.to_vec()));
    }

    /// Sets `name` to one value: the first occurrence is replaced in place (so pseudo-headers
    /// keep their position), later ones removed; an absent name is appended.
    pub fn set(&mut self, name: &str, value: &[u8]) {
        self.modified = true;
        let mut seen = false;
        self.pairs.retain_mut(|(n, v)| {
            if !n.eq_ignore_ascii_case(name) {
                return true;
            }
            if seen {
                return false;
            }
            seen = true;
            *v = value.to_vec();
            true
        });
        if !seen {
            self.pairs.push((name.to_ascii_lowercase(), value.to_vec()));
        }
    }

    /// Removes every value of `name`.
    pub fn remove(&mut self, name: &str) {
        let before = self.pairs.len();
        self.pairs.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.modified |= self.pairs.len() != before;
    }

    /// Replaces the whole map.
    pub fn replace_all(&mut self, pairs: Vec<(String, Vec<u8>)>) {
        self.modified = true;
        self.pairs = pairs
            .into_iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v))
            .collect();
    }

    /// The pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> + Clone {
        self.pairs.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Whether a plugin changed the map since it was built.
    pub fn is_modified(&self) -> bool {
        self.modified
    }

    /// Serialized with the ABI's pairs encoding.
    pub(crate) fn encode(&self) -> Vec<u8> {
        encode_pairs(self.iter())
    }
}

impl<'a> FromIterator<(&'a str, &'a [u8])> for Headers {
    fn from_iter<I: IntoIterator<Item = (&'a str, &'a [u8])>>(iter: I) -> Headers {
        let mut h = Headers::new();
        for (n, v) in iter {
            h.push(n, v);
        }
        h
    }
}

/// Encodes pairs: a little-endian u32 count, then a (name length, value length) u32 pair for each,
/// then each name and value followed by a NUL. Lengths exclude the NULs.
pub(crate) fn encode_pairs<'a>(
    pairs: impl Iterator<Item = (&'a str, &'a [u8])> + Clone,
) -> Vec<u8> {
    let (count, bytes) = pairs.clone().fold((0usize, 0usize), |(c, b), (n, v)| {
        (c + 1, b + n.len() + v.len() + 2)
    });
    let mut out = Vec::with_capacity(4 + 8 * count + bytes);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    for (n, v) in pairs.clone() {
        out.extend_from_slice(&(n.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (n, v) in pairs {
        out.extend_from_slice(n.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Why a pairs buffer could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// Decodes the pairs encoding. An empty buffer (or a lone NUL) is an empty map; names must be
/// UTF-8, values need not be.
pub(crate) fn decode_pairs(buf: &[u8]) -> Result<Vec<(String, Vec<u8>)>, Malformed> {
    if buf.len() <= 1 {
        return Ok(Vec::new());
    }
    let u32_at = |at: usize| -> Result<usize, Malformed> {
        let b = buf.get(at..at + 4).ok_or(Malformed)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let count = u32_at(0)?;
    let mut lengths = Vec::with_capacity(count.min(buf.len() / 8));
    for i in 0..count {
        lengths.push((u32_at(4 + 8 * i)?, u32_at(8 + 8 * i)?));
    }
    let mut at = 4 + 8 * count;
    let mut take = |len: usize| -> Result<&[u8], Malformed> {
        let end = at.checked_add(len).ok_or(Malformed)?;
        let field = buf.get(at..end).ok_or(Malformed)?;
        // Each field is followed by a NUL.
        if buf.get(end) != Some(&0) {
            return Err(Malformed);
        }
        at = end + 1;
        Ok(field)
    };
    let mut pairs = Vec::with_capacity(lengths.len());
    for (nlen, vlen) in lengths {
        let name = std::str::from_utf8(take(nlen)?).map_err(|_| Malformed)?;
        let value = take(vlen)?;
        pairs.push((name.to_owned(), value.to_vec()));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_like_the_rust_sdk() {
        let h: Headers = [(":path", &b"/a"[..]), ("x-k", b"v1"), ("x-k", b"")]
            .into_iter()
            .collect();
        let bytes = h.encode();
        // count, 3 length pairs, then ":path\0/a\0x-k\0v1\0x-k\0\0".
        assert_eq!(&bytes[..4], &3u32.to_le_bytes());
        assert_eq!(&bytes[4..12], &[5, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(&bytes[28..], b":path\0/a\0x-k\0v1\0x-k\0\0");
        let back = decode_pairs(&bytes).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[1], ("x-k".to_owned(), b"v1".to_vec()));
        assert_eq!(back[2], ("x-k".to_owned(), Vec::new()));
    }

    #[test]
    fn empty_and_malformed_buffers() {
        assert_eq!(decode_pairs(&[]).unwrap(), Vec::new());
        assert_eq!(decode_pairs(&[0]).unwrap(), Vec::new());
        assert_eq!(encode_pairs(std::iter::empty()), 0u32.to_le_bytes());
        // Count says 1, no lengths.
        assert_eq!(decode_pairs(&1u32.to_le_bytes()), Err(Malformed));
        // Lengths point past the end.
        let mut b = 1u32.to_le_bytes().to_vec();
        b.extend_from_slice(&[9, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(b"ab\0\0");
        assert_eq!(decode_pairs(&b), Err(Malformed));
        // Missing NUL terminator.
        let mut b = 1u32.to_le_bytes().to_vec();
        b.extend_from_slice(&[1, 0, 0, 0, 1, 0, 0, 0]);
        b.extend_from_slice(b"abcd");
        assert_eq!(decode_pairs(&b), Err(Malformed));
        // A huge count cannot make us allocate its worth.
        assert_eq!(decode_pairs(&u32::MAX.to_le_bytes()), Err(Malformed));
    }

    #[test]
    fn set_keeps_position_and_drops_duplicates() {
        let mut h: Headers = [(":path", &b"/a"[..]), ("a", b"1"), ("A", b"2"), ("b", b"3")]
            .into_iter()
            .collect();
        assert!(!h.is_modified());
        h.set("a", b"9");
        let names: Vec<_> = h.iter().map(|(n, v)| (n, v.to_vec())).collect();
        assert_eq!(
            names,
            vec![
                (":path", b"/a".to_vec()),
                ("a", b"9".to_vec()),
                ("b", b"3".to_vec())
            ]
        );
        assert!(h.is_modified());
        h.set("c", b"new");
        assert_eq!(h.get("C"), Some(&b"new"[..]));
        h.remove("b");
        assert_eq!(h.get("b"), None);
    }

    #[test]
    fn removing_an_absent_header_changes_nothing() {
        let mut h: Headers = [("a", &b"1"[..])].into_iter().collect();
        h.remove("zz");
        assert!(!h.is_modified());
    }
}
