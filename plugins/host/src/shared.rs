//! Shared data and shared queues: process-wide state plugins use to talk across instances.
//!
//! Envoy keys both by VM id; Istio leaves the VM id empty, so every plugin in the proxy shares one
//! namespace. Each key carries a CAS counter that grows on every write.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::{Mutex, Weak};

use crate::abi::Status;
use crate::vm::Instance;

/// Shared key-value data and queues.
/// Value and CAS counter by key.
type Entries = HashMap<Vec<u8>, (Vec<u8>, u32)>;

#[derive(Debug, Default)]
pub(crate) struct Shared {
    data: Mutex<Entries>,
    queues: Mutex<Queues>,
}

#[derive(Debug, Default)]
struct Queues {
    by_name: HashMap<String, u32>,
    list: Vec<Queue>,
}

#[derive(Debug)]
struct Queue {
    items: VecDeque<Vec<u8>>,
    /// The root context that registered the queue, told by `on_queue_ready`.
    owner: Weak<Instance>,
}

impl Shared {
    pub(crate) fn get(&self, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        self.data.lock().expect("shared data").get(key).cloned()
    }

    pub(crate) fn set(&self, key: &[u8], value: &[u8], cas: u32) -> Status {
        let mut data = self.data.lock().expect("shared data");
        match data.get_mut(key) {
            Some((_, current)) if cas != 0 && *current != cas => Status::CasMismatch,
            Some((v, current)) => {
                *v = value.to_vec();
                *current = current.wrapping_add(1).max(1);
                Status::Ok
            }
            None => {
                data.insert(key.to_vec(), (value.to_vec(), 1));
                Status::Ok
            }
        }
    }

    /// Registers (or re-registers) `name`; the owner becomes `owner`.
    pub(crate) fn register_queue(&self, name: &str, owner: Weak<Instance>) -> u32 {
        let mut q = self.queues.lock().expect("queues");
        if let Some(&id) = q.by_name.get(name) {
            q.list[id as usize].owner = owner;
            return id;
        }
        let id = q.list.len() as u32;
        q.list.push(Queue {
            items: VecDeque::new(),
            owner,
        });
        q.by_name.insert(name.to_owned(), id);
        id
    }

    pub(crate) fn resolve_queue(&self, name: &str) -> Option<u32> {
        self.queues
            .lock()
            .expect("queues")
            .by_name
            .get(name)
            .copied()
    }

    /// Appends an item; returns the owner to notify.
    pub(crate) fn enqueue(&self, id: u32, item: &[u8]) -> Result<Weak<Instance>, Status> {
        let mut q = self.queues.lock().expect("queues");
        let queue = q.list.get_mut(id as usize).ok_or(Status::NotFound)?;
        queue.items.push_back(item.to_vec());
        Ok(queue.owner.clone())
    }

    pub(crate) fn dequeue(&self, id: u32) -> Result<Vec<u8>, Status> {
        let mut q = self.queues.lock().expect("queues");
        let queue = q.list.get_mut(id as usize).ok_or(Status::NotFound)?;
        queue.items.pop_front().ok_or(Status::Empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_guards_writes() {
        let s = Shared::default();
        assert!(s.get(b"k").is_none());
        assert_eq!(s.set(b"k", b"v1", 0), Status::Ok);
        let (v, cas) = s.get(b"k").unwrap();
        assert_eq!(v, b"v1");
        assert_eq!(s.set(b"k", b"v2", cas + 7), Status::CasMismatch);
        assert_eq!(s.set(b"k", b"v2", cas), Status::Ok);
        assert_eq!(s.set(b"k", b"v3", cas), Status::CasMismatch);
        assert_eq!(s.get(b"k").unwrap().0, b"v2");
    }

    #[test]
    fn queues_are_fifo_and_report_unknown_ids() {
        let s = Shared::default();
        let id = s.register_queue("q", Weak::new());
        assert_eq!(s.register_queue("q", Weak::new()), id);
        assert_eq!(s.resolve_queue("q"), Some(id));
        assert_eq!(s.resolve_queue("nope"), None);
        assert_eq!(s.dequeue(id), Err(Status::Empty));
        s.enqueue(id, b"a").unwrap();
        s.enqueue(id, b"b").unwrap();
        assert_eq!(s.dequeue(id).unwrap(), b"a");
        assert_eq!(s.dequeue(id).unwrap(), b"b");
        assert_eq!(s.dequeue(99), Err(Status::NotFound));
        assert!(s.enqueue(99, b"x").is_err());
    }
}
