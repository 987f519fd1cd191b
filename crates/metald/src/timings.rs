//! How long lifecycle steps take, as histograms the API layer exports on `/metrics`
//! (`metald_vm_step_duration_seconds{step}`). The API's request histogram times whole calls;
//! these split a boot into its parts and add what no call waits for: the guest becoming ready.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// A lifecycle step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Network namespace, veth, firewall and jail set up for a VMM start.
    Sandbox,
    /// The VMM process started and configured, up to its guest starting to run.
    VmmStart,
    /// From the VMM start to the guest's readiness line on its console.
    GuestReady,
}

impl Step {
    fn as_str(self) -> &'static str {
        match self {
            Step::Sandbox => "sandbox",
            Step::VmmStart => "vmm_start",
            Step::GuestReady => "guest_ready",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    step: &'static str,
}

/// The step histograms (cheap to clone: the family is shared).
#[derive(Clone, Debug)]
pub struct Timings {
    steps: Family<StepLabel, Histogram>,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            // 1 ms .. ~65 s: a jail set-up and a slow guest under TCG.
            steps: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 17))
            }),
        }
    }
}

impl Timings {
    /// Records that `step` took `secs`.
    pub fn observe(&self, step: Step, secs: f64) {
        self.steps
            .get_or_create(&StepLabel {
                step: step.as_str(),
            })
            .observe(secs);
    }

    /// Adds the histograms to `registry`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "metald_vm_step_duration_seconds",
            "Duration of lifecycle steps: sandbox set-up, VMM start, VMM start to guest ready",
            self.steps.clone(),
        );
    }
}
