//! Readiness problems that components report for the admin `/ready`
//! endpoint.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

/// Shared set of current problems, keyed by component. The proxy is ready
/// while the set is empty.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    problems: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `component` is failing, replacing its earlier message.
    pub fn fail(&self, component: &str, message: impl Into<String>) {
        self.lock().insert(component.to_string(), message.into());
    }

    /// Clears the problem of `component`, if any.
    pub fn recover(&self, component: &str) {
        self.lock().remove(component);
    }

    /// Returns one line per current problem: `component: message`.
    pub fn problems(&self) -> Vec<String> {
        self.lock()
            .iter()
            .map(|(component, message)| format!("{component}: {message}"))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.problems
            .lock()
            .expect("readiness lock is never poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_and_recover() {
        let readiness = Readiness::new();
        assert!(readiness.problems().is_empty());
        readiness.fail("spool /tmp/a", "write failed");
        readiness.fail("spool /tmp/a", "write failed again");
        assert_eq!(
            readiness.problems(),
            vec!["spool /tmp/a: write failed again"]
        );
        readiness.recover("spool /tmp/a");
        assert!(readiness.problems().is_empty());
    }
}
