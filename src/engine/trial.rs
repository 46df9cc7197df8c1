//! Trial installs (SPEC §3): with `confirm_required`, a committed install stays a trial until
//! confirmed; every boot it runs in is counted (boots told apart by the kernel's boot id),
//! and after `max_trial_boots` unconfirmed boots it is rolled back. Like RAUC's mark-good and
//! Mender's commit.

use super::Hash;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// The install transaction, and the generation it made (the same id).
    pub tx: u64,
    pub version: String,
    /// The package, remembered as failed if the trial expires.
    pub package: Hash,
    /// Boots the trial has run in, the install's own boot included.
    pub boots: u32,
    /// The boot id of the last boot counted.
    pub boot_id: String,
}

impl Trial {
    pub fn begin(tx: u64, version: &str, package: Hash, boot_id: &str) -> Trial {
        Trial { tx, version: version.to_string(), package, boots: 1, boot_id: boot_id.to_string() }
    }

    /// The trial as counted in boot `boot_id`; `None` when this boot is already counted.
    pub fn count_boot(&self, boot_id: &str) -> Option<Trial> {
        (self.boot_id != boot_id).then(|| Trial {
            boots: self.boots.saturating_add(1),
            boot_id: boot_id.to_string(),
            ..self.clone()
        })
    }

    /// It has run in more than `max_boots` boots without confirmation: roll it back. With
    /// `max_boots = 1` that is the first boot after the install.
    pub fn expired(&self, max_boots: u32) -> bool {
        self.boots > max_boots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_new_boot_counts_once_and_the_install_boot_counts_as_one() {
        let t = Trial::begin(7, "2.0.0", Hash([1; 32]), "boot-a");
        assert_eq!(t.boots, 1);
        assert!(t.count_boot("boot-a").is_none(), "the same boot is never counted twice");
        let t2 = t.count_boot("boot-b").unwrap();
        assert_eq!((t2.boots, t2.boot_id.as_str()), (2, "boot-b"));
        assert!(t2.count_boot("boot-b").is_none());
    }

    #[test]
    fn expires_after_max_boots_unconfirmed_boots() {
        let t = Trial::begin(7, "2.0.0", Hash([1; 32]), "a");
        assert!(!t.expired(1));
        let t = t.count_boot("b").unwrap();
        assert!(t.expired(1), "max_trial_boots = 1 rolls back at the next boot");
        assert!(!t.expired(3));
        let t = t.count_boot("c").unwrap().count_boot("d").unwrap();
        assert!(t.expired(3) && t.boots == 4);
    }
}
