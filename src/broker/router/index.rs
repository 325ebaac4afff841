//! The subscription index: a tree of topic levels that answers "who is subscribed to this topic?"
//! without looking at subscriptions that cannot match.
//!
//! A filter such as `a/+/c/#` is stored as a path from the root: one node per level, where a level is
//! either an exact string (kept in the parent's `HashMap`, keyed by a `Box<str>`), the single-level
//! wildcard `+` (the parent's `plus` child) or the multi-level wildcard `#` (the parent's `hash` child).
//! The node at the end of the path holds the subscriptions to that filter: the plain ones (key → options)
//! and the shared ones, grouped by share name (MQTT 5.0 `$share/{group}/{filter}`, handed to [`Index`]
//! already split into the group name and the inner filter).
//!
//! Matching follows MQTT 3.1.1 §4.7 / MQTT 5.0 §4.7:
//! * levels are separated by `/`, and empty levels are real levels (`a//b`, `/a` and `a/` have three,
//!   two and two levels);
//! * `+` matches exactly one level, an empty one included;
//! * `#` matches its parent level and any number of levels below it (`a/#` matches `a`, `a/b`, `a/b/c`);
//! * a topic whose first level starts with `$` is not matched by a filter whose first level is `+` or
//!   `#`; a filter whose first level is literally `$SYS` (or any `$…`) matches it as usual.
//!
//! A publish walks only the branches that can match: at each node the exact child for the topic's next
//! level, the `+` child and the `#` child. Nothing is scanned.
//!
//! Memory: a node exists only while some subscription's filter passes through it. Removing the last
//! subscription of a filter frees the nodes that nothing else uses, and empty share groups are dropped
//! at once. Every walk (insert, remove, match, drop) is iterative, so a filter with tens of thousands of
//! levels cannot overflow the stack.
//!
//! Filters are expected to be valid (`#` only as the last level, wildcards only as whole levels); the
//! caller validates them. An invalid filter with levels after a `#` is still stored consistently and
//! matched the way a filter cut off at that `#` would be, so insert/remove stay exact inverses.

use std::collections::HashMap;
use std::hash::Hash;

#[cfg(test)]
use crate::broker::topics::matches;

/// A node's plain subscriptions move from a `Vec` to a `HashMap` when they would exceed this many...
const PROMOTE_ABOVE: usize = 32;
/// ...and back to a `Vec` when they drop to this many.
const DEMOTE_AT: usize = 8;

/// The plain (non-shared) subscriptions to one filter. Small sets, by far the common case, are a `Vec`
/// searched linearly; large ones are a boxed `HashMap` so that insert and remove stay O(1).
enum Subs<K, O> {
    Small(Vec<(K, O)>),
    // Boxed so that `Subs`, and so every node, stays the size of a `Vec` rather than of a `HashMap`.
    #[allow(clippy::box_collection)]
    Large(Box<HashMap<K, O>>),
}

impl<K, O> Subs<K, O> {
    fn len(&self) -> usize {
        match self {
            Subs::Small(v) => v.len(),
            Subs::Large(m) => m.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn for_each<F: FnMut(&K, &O)>(&self, f: &mut F) {
        match self {
            Subs::Small(v) => v.iter().for_each(|(k, o)| f(k, o)),
            Subs::Large(m) => m.iter().for_each(|(k, o)| f(k, o)),
        }
    }
}

impl<K: Eq + Hash, O> Subs<K, O> {
    /// Adds or replaces; true if it replaced.
    fn insert(&mut self, key: K, opts: O) -> bool {
        match self {
            Subs::Small(v) => {
                if let Some(slot) = v.iter_mut().find(|(k, _)| *k == key) {
                    slot.1 = opts;
                    return true;
                }
                if v.len() < PROMOTE_ABOVE {
                    v.push((key, opts));
                } else {
                    let mut m: HashMap<K, O> = std::mem::take(v).into_iter().collect();
                    m.insert(key, opts);
                    *self = Subs::Large(Box::new(m));
                }
                false
            }
            Subs::Large(m) => m.insert(key, opts).is_some(),
        }
    }

    fn remove(&mut self, key: &K) -> Option<O> {
        match self {
            Subs::Small(v) => {
                let i = v.iter().position(|(k, _)| k == key)?;
                let (_, opts) = v.swap_remove(i);
                shrink_vec(v);
                Some(opts)
            }
            Subs::Large(m) => {
                let opts = m.remove(key)?;
                if m.len() <= DEMOTE_AT {
                    *self = Subs::Small(m.drain().collect());
                } else if m.len() * 4 < m.capacity() {
                    m.shrink_to_fit();
                }
                Some(opts)
            }
        }
    }
}

/// Gives back a `Vec`'s spare memory once it is mostly unused (amortised O(1): after a shrink the
/// length has to fall by half again before the next one).
fn shrink_vec<T>(v: &mut Vec<T>) {
    if v.len() * 4 < v.capacity() {
        v.shrink_to_fit();
    }
}

/// The members of one share group on one filter, in the order they joined.
struct Group<K, O> {
    name: Box<str>,
    /// The inner filter, kept so that a match can report it without rebuilding it from the path.
    filter: Box<str>,
    members: Vec<(K, O)>,
}

/// One topic level of the tree.
struct Node<K, O> {
    /// Children for exact (non-wildcard) levels.
    children: HashMap<Box<str>, Box<Node<K, O>>>,
    /// Child for a `+` level.
    plus: Option<Box<Node<K, O>>>,
    /// Child for a `#` level.
    hash: Option<Box<Node<K, O>>>,
    /// Plain subscriptions whose filter ends at this node.
    subs: Subs<K, O>,
    /// Shared subscriptions whose inner filter ends at this node, one entry per group name.
    groups: Vec<Group<K, O>>,
}

impl<K, O> Node<K, O> {
    fn new() -> Self {
        Node {
            children: HashMap::new(),
            plus: None,
            hash: None,
            subs: Subs::Small(Vec::new()),
            groups: Vec::new(),
        }
    }

    fn child_count(&self) -> usize {
        self.children.len() + usize::from(self.plus.is_some()) + usize::from(self.hash.is_some())
    }

    /// Does any subscription end here?
    fn has_subscriptions(&self) -> bool {
        !self.subs.is_empty() || !self.groups.is_empty()
    }

    /// Nothing ends here and nothing passes through: the node can be freed.
    fn is_unused(&self) -> bool {
        !self.has_subscriptions() && self.child_count() == 0
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<K, O>> {
        match level {
            "+" => self.plus.as_deref_mut(),
            "#" => self.hash.as_deref_mut(),
            _ => self.children.get_mut(level).map(|b| &mut **b),
        }
    }

    /// The child for `level`, created (and counted in `created`) if missing.
    fn child_or_insert(&mut self, level: &str, created: &mut usize) -> &mut Node<K, O> {
        let slot = match level {
            "+" => &mut self.plus,
            "#" => &mut self.hash,
            _ => {
                if !self.children.contains_key(level) {
                    self.children.insert(level.into(), Box::new(Node::new()));
                    *created += 1;
                }
                return self.children.get_mut(level).expect("child was just ensured");
            }
        };
        slot.get_or_insert_with(|| {
            *created += 1;
            Box::new(Node::new())
        })
    }

    /// Detaches the child for `level` (and so its whole subtree).
    fn take_child(&mut self, level: &str) -> Option<Box<Node<K, O>>> {
        match level {
            "+" => self.plus.take(),
            "#" => self.hash.take(),
            _ => {
                let child = self.children.remove(level);
                if self.children.len() * 4 < self.children.capacity() {
                    self.children.shrink_to_fit();
                }
                child
            }
        }
    }

    /// Reports the subscriptions that end at this node.
    fn emit<F, G>(&self, f: &mut F, g: &mut G)
    where
        F: FnMut(&K, &O),
        G: FnMut(&str, &str, &[(K, O)]),
    {
        self.subs.for_each(f);
        for group in &self.groups {
            g(&group.name, &group.filter, &group.members);
        }
    }

    /// Reports the subscriptions of a `#` node. A valid filter ends at `#`, so this is normally just
    /// [`Node::emit`]; levels after a `#` (an invalid filter) are matched like the `#` itself.
    fn emit_hash<F, G>(&self, f: &mut F, g: &mut G)
    where
        F: FnMut(&K, &O),
        G: FnMut(&str, &str, &[(K, O)]),
    {
        self.emit(f, g);
        if self.child_count() == 0 {
            return;
        }
        let mut stack: Vec<&Node<K, O>> = Vec::new();
        self.push_children(&mut stack);
        while let Some(node) = stack.pop() {
            node.emit(f, g);
            node.push_children(&mut stack);
        }
    }

    fn push_children<'a>(&'a self, stack: &mut Vec<&'a Node<K, O>>) {
        stack.extend(self.children.values().map(|b| &**b));
        stack.extend(self.plus.as_deref());
        stack.extend(self.hash.as_deref());
    }
}

impl<K: Eq + Hash, O> Node<K, O> {
    /// Adds or replaces a subscription ending here; true if it replaced.
    fn insert_here(&mut self, filter: &str, group: Option<&str>, key: K, opts: O) -> bool {
        let Some(name) = group else {
            return self.subs.insert(key, opts);
        };
        let Some(group) = self.groups.iter_mut().find(|g| &*g.name == name) else {
            self.groups.push(Group {
                name: name.into(),
                filter: filter.into(),
                members: vec![(key, opts)],
            });
            return false;
        };
        match group.members.iter_mut().find(|(k, _)| *k == key) {
            Some(member) => {
                member.1 = opts;
                true
            }
            None => {
                group.members.push((key, opts));
                false
            }
        }
    }

    /// Removes a subscription ending here, dropping its group if that empties it.
    fn remove_here(&mut self, group: Option<&str>, key: &K) -> Option<O> {
        let Some(name) = group else {
            return self.subs.remove(key);
        };
        let gi = self.groups.iter().position(|g| &*g.name == name)?;
        let members = &mut self.groups[gi].members;
        let mi = members.iter().position(|(k, _)| k == key)?;
        // `remove`, not `swap_remove`: members stay in the order they joined.
        let (_, opts) = members.remove(mi);
        if members.is_empty() {
            self.groups.swap_remove(gi);
            shrink_vec(&mut self.groups);
        } else {
            shrink_vec(members);
        }
        Some(opts)
    }
}

impl<K, O> Drop for Node<K, O> {
    /// Frees the subtree iteratively: the default recursive drop could overflow the stack on a filter
    /// with very many levels.
    fn drop(&mut self) {
        if self.child_count() == 0 {
            return;
        }
        let mut stack: Vec<Box<Node<K, O>>> = Vec::new();
        self.drain_children(&mut stack);
        while let Some(mut node) = stack.pop() {
            node.drain_children(&mut stack);
            // `node` now has no children, so dropping it here does not recurse.
        }
    }
}

impl<K, O> Node<K, O> {
    // The boxes are the tree's own allocations, moved as they are: no node is copied out of its box.
    #[allow(clippy::vec_box)]
    fn drain_children(&mut self, out: &mut Vec<Box<Node<K, O>>>) {
        out.extend(self.children.drain().map(|(_, child)| child));
        out.extend(self.plus.take());
        out.extend(self.hash.take());
    }
}

/// The subscription index. `K` identifies a subscriber (a session key such as `u64` or `Arc<str>`),
/// `O` is what the broker keeps per subscription (QoS, no-local, retain handling, identifier, ...).
pub struct Index<K, O> {
    root: Node<K, O>,
    /// Nodes allocated, the root excepted.
    nodes: usize,
    /// Plain subscriptions plus shared-group memberships.
    len: usize,
}

impl<K: Clone + Eq + Hash + Ord, O: Clone> Default for Index<K, O> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Clone + Eq + Hash + Ord, O: Clone> Index<K, O> {
    pub fn new() -> Self {
        Index {
            root: Node::new(),
            nodes: 0,
            len: 0,
        }
    }

    /// Adds or replaces `key`'s subscription to `filter` (a plain filter like "a/+/c/#"; shared ones
    /// arrive as `group: Some("g")` with the inner filter). Returns true if it replaced an existing one.
    ///
    /// A plain subscription and a shared one, or shared ones in different groups, are distinct
    /// subscriptions even for the same key and filter. Replacing a group member keeps its place in the
    /// group's order.
    pub fn insert(&mut self, filter: &str, group: Option<&str>, key: K, opts: O) -> bool {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.child_or_insert(level, &mut self.nodes);
        }
        let replaced = node.insert_here(filter, group, key, opts);
        if !replaced {
            self.len += 1;
        }
        replaced
    }

    /// Removes it; returns the options it had. Empty tree nodes and empty groups are freed at once.
    pub fn remove(&mut self, filter: &str, group: Option<&str>, key: &K) -> Option<O> {
        // Walk down to the filter's node, remembering the deepest node on the way that stays whatever
        // happens below it: the root, or one that has subscriptions or another child. If the filter's
        // node ends up unused, everything below that node on this path is used by nothing else.
        let mut keep = 0; // depth of that node; the root is depth 0
        let mut depth = 0;
        let mut node = &mut self.root;
        for level in filter.split('/') {
            if depth > 0 && (node.has_subscriptions() || node.child_count() > 1) {
                keep = depth;
            }
            node = node.child_mut(level)?;
            depth += 1;
        }
        let opts = node.remove_here(group, key)?;
        self.len -= 1;
        if node.is_unused() {
            let mut levels = filter.split('/');
            let mut cut = &mut self.root;
            for level in levels.by_ref().take(keep) {
                cut = cut.child_mut(level).expect("the path was just walked");
            }
            let level = levels.next().expect("the filter has more than `keep` levels");
            drop(cut.take_child(level));
            self.nodes -= depth - keep;
        }
        Some(opts)
    }

    /// Every non-shared subscription matching `topic`: calls `f(key, opts)` once per (key, filter) pair.
    /// Shared groups matching `topic`: calls `g(group_name, filter, members)` once per matching group
    /// where `members: &[(K, O)]` in a stable order (insertion order), so the caller can pick one member.
    ///
    /// A group is identified by (group name, inner filter): the same name on two matching filters gives
    /// two calls. Calls come in no particular order.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&K, &O), mut g: impl FnMut(&str, &str, &[(K, O)])) {
        // Work list of (node, the topic after the levels that led to the node, is it the root).
        // `None` for the rest means the topic's levels are used up at that node.
        let mut stack: Vec<(&Node<K, O>, Option<&str>, bool)> = vec![(&self.root, Some(topic), true)];
        while let Some((node, rest, first)) = stack.pop() {
            let Some(rest) = rest else {
                // The topic ends here: the filters ending here match, and so does a `#` below
                // (`a/#` matches `a`).
                node.emit(&mut f, &mut g);
                if let Some(hash) = &node.hash {
                    hash.emit_hash(&mut f, &mut g);
                }
                continue;
            };
            let (level, tail) = match rest.split_once('/') {
                Some((level, tail)) => (level, Some(tail)),
                None => (rest, None),
            };
            if !(first && level.starts_with('$')) {
                if let Some(hash) = &node.hash {
                    hash.emit_hash(&mut f, &mut g);
                }
                if let Some(plus) = &node.plus {
                    stack.push((plus, tail, false));
                }
            }
            if let Some(child) = node.children.get(level) {
                stack.push((child, tail, false));
            }
        }
    }

    /// Tree nodes allocated, for tests and metrics. The root, which always exists, is not counted, so
    /// an empty index has 0.
    pub fn node_count(&self) -> usize {
        self.nodes
    }

    /// Subscriptions held (plain + shared memberships).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    type Shared<O> = Vec<(String, String, Vec<(u32, O)>)>;

    /// Plain matches as a sorted list (duplicates kept, so a double report shows) and shared matches
    /// sorted by (group, filter) with members in the order given.
    fn lookup<O: Clone + Ord>(idx: &Index<u32, O>, topic: &str) -> (Vec<(u32, O)>, Shared<O>) {
        let mut plain = Vec::new();
        let mut shared = Vec::new();
        idx.for_each_match(
            topic,
            |k, o| plain.push((*k, o.clone())),
            |name, filter, members| shared.push((name.to_string(), filter.to_string(), members.to_vec())),
        );
        plain.sort();
        shared.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        (plain, shared)
    }

    /// The filters of the plain subscriptions matching `topic`, in an index whose options are the filter.
    fn plain_filters(idx: &Index<u32, &'static str>, topic: &str) -> Vec<&'static str> {
        let mut v: Vec<_> = lookup(idx, topic).0.into_iter().map(|(_, f)| f).collect();
        v.sort();
        v
    }

    fn index_of(filters: &[&'static str]) -> Index<u32, &'static str> {
        let mut idx = Index::new();
        for f in filters {
            assert!(!idx.insert(f, None, 1, *f));
        }
        idx
    }

    #[test]
    fn empty_levels_are_real_levels() {
        let idx = index_of(&["a//b", "/a", "a/", "a/+/b", "+/a", "a/+", "a", "", "+", "/", "+/+"]);
        assert_eq!(plain_filters(&idx, "a//b"), ["a/+/b", "a//b"]);
        assert_eq!(plain_filters(&idx, "/a"), ["+/+", "+/a", "/a"]);
        assert_eq!(plain_filters(&idx, "a/"), ["+/+", "a/", "a/+"]);
        assert_eq!(plain_filters(&idx, "a"), ["+", "a"]);
        assert_eq!(plain_filters(&idx, ""), ["", "+"]);
        assert_eq!(plain_filters(&idx, "/"), ["+/+", "/"]);
        assert!(plain_filters(&idx, "a/b/c").is_empty());
    }

    #[test]
    fn plus_matches_one_level_even_an_empty_one() {
        let idx = index_of(&["+/+/+", "a/+/c", "+"]);
        assert_eq!(plain_filters(&idx, "a//c"), ["+/+/+", "a/+/c"]);
        assert_eq!(plain_filters(&idx, "//"), ["+/+/+"]);
        assert_eq!(plain_filters(&idx, "a/c"), Vec::<&str>::new());
        assert_eq!(plain_filters(&idx, ""), ["+"]);
        assert_eq!(plain_filters(&idx, "a/b/c/d"), Vec::<&str>::new());
    }

    #[test]
    fn hash_matches_the_parent_and_everything_below() {
        let idx = index_of(&["a/#", "#", "a/b/#", "+/#", "/#"]);
        assert_eq!(plain_filters(&idx, "a"), ["#", "+/#", "a/#"]);
        assert_eq!(plain_filters(&idx, "a/b"), ["#", "+/#", "a/#", "a/b/#"]);
        assert_eq!(plain_filters(&idx, "a/b/c/d"), ["#", "+/#", "a/#", "a/b/#"]);
        assert_eq!(plain_filters(&idx, "b"), ["#", "+/#"]);
        assert_eq!(plain_filters(&idx, "/"), ["#", "+/#", "/#"]);
        // `/#` is `""` then `#`, and `#` matches its parent: the empty topic is one empty level.
        assert_eq!(plain_filters(&idx, ""), ["#", "+/#", "/#"]);
    }

    #[test]
    fn dollar_topics_need_a_literal_first_level() {
        let idx = index_of(&["#", "+", "+/b", "+/#", "$SYS/#", "$SYS/+", "$SYS", "a/+", "a/#"]);
        assert_eq!(plain_filters(&idx, "$SYS"), ["$SYS", "$SYS/#"]);
        assert_eq!(plain_filters(&idx, "$SYS/b"), ["$SYS/#", "$SYS/+"]);
        assert!(plain_filters(&idx, "$other/b").is_empty());
        // Only the first level is special.
        assert_eq!(plain_filters(&idx, "a/$SYS"), ["#", "+/#", "a/#", "a/+"]);
        // A `$` anywhere but at the start of the first level is ordinary.
        assert_eq!(plain_filters(&idx, "x$/b"), ["#", "+/#", "+/b"]);
    }

    #[test]
    fn shared_groups_are_kept_apart_per_group_and_filter() {
        let mut idx: Index<u32, u8> = Index::new();
        assert!(!idx.insert("a/+", Some("g"), 3, 0));
        assert!(!idx.insert("a/+", Some("g"), 1, 0));
        assert!(!idx.insert("a/+", Some("g"), 2, 0));
        assert!(!idx.insert("a/b", Some("g"), 1, 0));
        assert!(!idx.insert("a/+", Some("h"), 1, 0));
        // The same key and filter, plain: a separate subscription.
        assert!(!idx.insert("a/+", None, 1, 7));
        assert_eq!(idx.len(), 6);

        let (plain, shared) = lookup(&idx, "a/b");
        assert_eq!(plain, [(1, 7)]);
        let expected = vec![
            ("g".to_string(), "a/+".to_string(), vec![(3, 0), (1, 0), (2, 0)]),
            ("g".to_string(), "a/b".to_string(), vec![(1, 0)]),
            ("h".to_string(), "a/+".to_string(), vec![(1, 0)]),
        ];
        assert_eq!(shared, expected);

        // Replacing a member keeps its place; removing one keeps the others' order.
        assert!(idx.insert("a/+", Some("g"), 1, 9));
        assert_eq!(idx.remove("a/+", Some("g"), &3), Some(0));
        assert!(!idx.insert("a/+", Some("g"), 3, 5));
        let (_, shared) = lookup(&idx, "a/x");
        assert_eq!(
            shared[0],
            ("g".to_string(), "a/+".to_string(), vec![(1, 9), (2, 0), (3, 5)])
        );

        // Only a group's own subscriptions are removed by a group remove.
        assert_eq!(idx.remove("a/+", Some("h"), &2), None);
        assert_eq!(idx.remove("a/+", Some("nope"), &1), None);
        assert_eq!(idx.remove("a/+", Some("h"), &1), Some(0));
        assert_eq!(idx.remove("a/+", None, &1), Some(7));
        let (plain, shared) = lookup(&idx, "a/b");
        assert!(plain.is_empty());
        assert_eq!(shared.len(), 2);
    }

    #[test]
    fn insert_replaces_an_existing_subscription() {
        let mut idx: Index<u32, u8> = Index::new();
        assert!(!idx.insert("a/b", None, 1, 0));
        assert!(!idx.insert("a/b", None, 2, 0));
        let nodes = idx.node_count();
        assert!(idx.insert("a/b", None, 1, 2));
        assert_eq!(idx.len(), 2);
        assert_eq!(idx.node_count(), nodes);
        assert_eq!(lookup(&idx, "a/b").0, [(1, 2), (2, 0)]);
        assert_eq!(idx.remove("a/b", None, &1), Some(2));
        assert_eq!(idx.remove("a/b", None, &1), None);
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn removal_frees_nodes_nothing_else_uses() {
        let mut idx: Index<u32, ()> = Index::new();
        assert_eq!((idx.node_count(), idx.len(), idx.is_empty()), (0, 0, true));
        idx.insert("a/b/c", None, 1, ());
        assert_eq!(idx.node_count(), 3);
        idx.insert("a/b", None, 1, ());
        assert_eq!(idx.node_count(), 3);
        idx.insert("a/+/#", Some("g"), 1, ());
        assert_eq!(idx.node_count(), 5);
        idx.insert("x/y/z/w", None, 2, ());
        assert_eq!(idx.node_count(), 9);
        assert_eq!(idx.len(), 4);

        // Misses leave the tree alone, including ones that stop midway or go past a filter's end.
        assert_eq!(idx.remove("a/b/c/d", None, &1), None);
        assert_eq!(idx.remove("a/b/c", None, &2), None);
        assert_eq!(idx.remove("a/b/c", Some("g"), &1), None);
        assert_eq!(idx.remove("x/y", None, &2), None);
        assert_eq!(idx.remove("q", None, &2), None);
        assert_eq!((idx.node_count(), idx.len()), (9, 4));

        // `a/b` still has a subscription, so only `c` goes.
        assert_eq!(idx.remove("a/b/c", None, &1), Some(()));
        assert_eq!(idx.node_count(), 8);
        // `a/b` has no child left: it goes, `a` stays for `a/+/#`.
        assert_eq!(idx.remove("a/b", None, &1), Some(()));
        assert_eq!(idx.node_count(), 7);
        assert_eq!(idx.remove("x/y/z/w", None, &2), Some(()));
        assert_eq!(idx.node_count(), 3);
        assert_eq!(idx.remove("a/+/#", Some("g"), &1), Some(()));
        assert_eq!((idx.node_count(), idx.len(), idx.is_empty()), (0, 0, true));
        assert_eq!(lookup(&idx, "a/b"), (vec![], vec![]));
    }

    #[test]
    fn many_subscribers_on_one_filter() {
        let mut idx: Index<u32, u32> = Index::new();
        for k in 0..200 {
            assert!(!idx.insert("t/+", None, k, k));
        }
        for k in (0..200).step_by(3) {
            assert!(idx.insert("t/+", None, k, k + 1000));
        }
        let (plain, _) = lookup(&idx, "t/x");
        let expected: Vec<_> = (0..200).map(|k| (k, if k % 3 == 0 { k + 1000 } else { k })).collect();
        assert_eq!(plain, expected);
        assert_eq!(idx.len(), 200);
        for k in (0..200).rev() {
            assert!(idx.remove("t/+", None, &k).is_some());
            assert_eq!(lookup(&idx, "t/x").0.len(), k as usize);
        }
        assert_eq!((idx.node_count(), idx.len()), (0, 0));
    }

    #[test]
    fn very_deep_filters_do_not_overflow_the_stack() {
        let deep = "/".repeat(200_000); // 200 001 empty levels
        let mut idx: Index<u32, ()> = Index::new();
        idx.insert(&deep, None, 1, ());
        idx.insert(&format!("{deep}/#"), None, 2, ());
        idx.insert(&format!("{deep}/+"), None, 3, ());
        assert_eq!(idx.node_count(), 200_003);
        assert_eq!(lookup(&idx, &deep).0, [(1, ()), (2, ())]);
        assert_eq!(lookup(&idx, &format!("{deep}/")).0, [(2, ()), (3, ())]);
        assert_eq!(idx.remove(&format!("{deep}/+"), None, &3), Some(()));
        assert_eq!(idx.remove(&format!("{deep}/#"), None, &2), Some(()));
        assert_eq!(idx.remove(&deep, None, &1), Some(()));
        assert_eq!(idx.node_count(), 0);
        // Dropping a deep tree (not emptied first) is iterative too.
        idx.insert(&deep, None, 1, ());
        drop(idx);
    }

    #[test]
    fn levels_after_a_hash_match_like_the_hash() {
        // Not valid filters, but stored consistently and matched like `super::topics::matches`.
        let mut idx = index_of(&["a/#/b", "#/x", "a/#"]);
        for topic in ["a", "a/b", "a/c/d", "$a", "b", ""] {
            let mut expected: Vec<_> = ["a/#/b", "#/x", "a/#"]
                .into_iter()
                .filter(|f| matches(topic, f))
                .collect();
            expected.sort();
            assert_eq!(plain_filters(&idx, topic), expected, "topic {topic:?}");
        }
        for f in ["a/#/b", "#/x", "a/#"] {
            assert_eq!(idx.remove(f, None, &1), Some(f));
        }
        assert_eq!(idx.node_count(), 0);
    }

    #[test]
    fn node_is_small() {
        println!(
            "Node<u64, u8>: {} bytes, Subs: {} bytes",
            std::mem::size_of::<Node<u64, u8>>(),
            std::mem::size_of::<Subs<u64, u8>>()
        );
        // Not a hard limit; guards against accidental growth of the per-node cost.
        assert!(
            std::mem::size_of::<Node<u64, u8>>() <= 128,
            "{}",
            std::mem::size_of::<Node<u64, u8>>()
        );
    }

    // ---- property tests against the reference matcher ----

    const GROUPS: [Option<&str>; 3] = [None, Some("g1"), Some("g2")];

    /// Filters with `#` only as the last level.
    fn valid_filter() -> BoxedStrategy<String> {
        let level = prop::sample::select(vec!["a", "b", "", "$x", "+"]);
        (vec(level, 0..5), any::<bool>(), any::<bool>())
            .prop_map(|(mut levels, hash, plus_end)| {
                if hash || levels.is_empty() {
                    levels.push(if hash { "#" } else { "a" });
                }
                if plus_end && !hash {
                    levels.push("+");
                }
                levels.join("/")
            })
            .boxed()
    }

    /// Anything from the alphabet, `#` anywhere (invalid filters included).
    fn any_filter() -> BoxedStrategy<String> {
        let level = prop::sample::select(vec!["a", "b", "", "$x", "+", "#"]);
        vec(level, 1..6).prop_map(|levels| levels.join("/")).boxed()
    }

    fn topic() -> impl Strategy<Value = String> {
        let level = prop::sample::select(vec!["a", "b", "", "$x"]);
        vec(level, 1..6).prop_map(|levels| levels.join("/"))
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(String, usize, u32),
        Remove(String, usize, u32),
    }

    fn ops(filter: BoxedStrategy<String>) -> impl Strategy<Value = Vec<Op>> {
        let insert = (filter.clone(), 0..GROUPS.len(), 0..4u32).prop_map(|(f, g, k)| Op::Insert(f, g, k));
        let remove = (filter, 0..GROUPS.len(), 0..4u32).prop_map(|(f, g, k)| Op::Remove(f, g, k));
        vec(prop_oneof![3 => insert, 1 => remove], 0..60)
    }

    /// One subscription in the model: (filter, group, key) → serial, kept in insertion order.
    type Model = Vec<((String, Option<&'static str>, u32), u32)>;

    /// The nodes a set of filters needs: one per distinct non-empty prefix of their levels.
    fn expected_nodes(model: &Model) -> usize {
        let mut prefixes = BTreeSet::new();
        for ((filter, _, _), _) in model {
            let levels: Vec<&str> = filter.split('/').collect();
            for n in 1..=levels.len() {
                prefixes.insert(levels[..n].to_vec());
            }
        }
        prefixes.len()
    }

    /// Options are (filter, serial), so a plain match names its filter.
    type Opts = (String, u32);

    fn check_against_model(idx: &Index<u32, Opts>, model: &Model, topic: &str) -> Result<(), TestCaseError> {
        let (plain, shared) = lookup(idx, topic);
        let mut want_plain: Vec<(u32, Opts)> = model
            .iter()
            .filter(|((f, g, _), _)| g.is_none() && matches(topic, f))
            .map(|((f, _, k), s)| (*k, (f.clone(), *s)))
            .collect();
        want_plain.sort();
        prop_assert_eq!(plain, want_plain, "plain matches of {:?}", topic);

        let mut want_shared: BTreeMap<(String, String), Vec<(u32, Opts)>> = BTreeMap::new();
        for ((f, g, k), s) in model {
            let Some(g) = g else { continue };
            if matches(topic, f) {
                want_shared
                    .entry((g.to_string(), f.clone()))
                    .or_default()
                    .push((*k, (f.clone(), *s)));
            }
        }
        let want_shared: Vec<_> = want_shared.into_iter().map(|((g, f), m)| (g, f, m)).collect();
        prop_assert_eq!(shared, want_shared, "shared matches of {:?}", topic);
        Ok(())
    }

    /// Applies `ops` to the index and to a model, checking every result, then matches `topics` against
    /// both, then removes everything in an order drawn from `seed` and checks the tree is empty again.
    fn run_ops(ops: Vec<Op>, topics: Vec<String>, mut seed: u64) -> Result<(), TestCaseError> {
        let mut idx: Index<u32, Opts> = Index::new();
        let mut model: Model = Vec::new();
        for (serial, op) in (0u32..).zip(ops) {
            match op {
                Op::Insert(f, g, k) => {
                    let id = (f.clone(), GROUPS[g], k);
                    let replaced = match model.iter_mut().find(|(i, _)| *i == id) {
                        Some(entry) => {
                            entry.1 = serial;
                            true
                        }
                        None => {
                            model.push((id, serial));
                            false
                        }
                    };
                    prop_assert_eq!(idx.insert(&f, GROUPS[g], k, (f.clone(), serial)), replaced);
                }
                Op::Remove(f, g, k) => {
                    let id = (f.clone(), GROUPS[g], k);
                    let want = model
                        .iter()
                        .position(|(i, _)| *i == id)
                        .map(|i| (f.clone(), model.remove(i).1));
                    prop_assert_eq!(idx.remove(&f, GROUPS[g], &k), want);
                }
            }
            prop_assert_eq!(idx.len(), model.len());
            prop_assert_eq!(idx.node_count(), expected_nodes(&model));
        }
        for topic in &topics {
            check_against_model(&idx, &model, topic)?;
        }
        while !model.is_empty() {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let ((f, g, k), s) = model.remove((seed >> 33) as usize % model.len());
            prop_assert_eq!(idx.remove(&f, g, &k), Some((f.clone(), s)));
            prop_assert_eq!(idx.node_count(), expected_nodes(&model));
            if let Some(topic) = topics.first() {
                check_against_model(&idx, &model, topic)?;
            }
        }
        prop_assert_eq!((idx.node_count(), idx.len(), idx.is_empty()), (0, 0, true));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn index_agrees_with_matches(ops in ops(valid_filter()), topics in vec(topic(), 1..16), seed in any::<u64>()) {
            run_ops(ops, topics, seed)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn index_agrees_with_matches_on_any_filter(
            ops in ops(any_filter()), topics in vec(topic(), 1..16), seed in any::<u64>()
        ) {
            run_ops(ops, topics, seed)?;
        }

        #[test]
        fn removing_everything_frees_every_node(
            (subs, order) in vec((valid_filter(), 0..GROUPS.len(), 0..4u32), 0..40)
                .prop_flat_map(|subs| {
                    let n = subs.len();
                    (Just(subs), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
                })
        ) {
            let mut idx: Index<u32, u32> = Index::new();
            let mut distinct = BTreeSet::new();
            for (f, g, k) in &subs {
                let fresh = distinct.insert((f.clone(), *g, *k));
                prop_assert_eq!(idx.insert(f, GROUPS[*g], *k, 0), !fresh);
            }
            prop_assert_eq!(idx.len(), distinct.len());
            for i in order {
                let (f, g, k) = &subs[i];
                let present = distinct.remove(&(f.clone(), *g, *k));
                prop_assert_eq!(idx.remove(f, GROUPS[*g], k), present.then_some(0));
                prop_assert_eq!(idx.len(), distinct.len());
            }
            prop_assert_eq!((idx.node_count(), idx.len(), idx.is_empty()), (0, 0, true));
        }
    }
}
