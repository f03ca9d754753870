//! How a model declares its named points: the one place a point's properties live. Injection
//! validates rules against these declarations, the KVM backend reads which points a doorbell
//! write reaches, and the oracle samples the hot ones; none of them keeps a list of its own.

/// One named point with the properties its model gives it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PointDecl {
    /// Stable name (`virtio-iommu.req.attach`, `virtio.blk0.notify`).
    pub name: String,
    /// The model can publish this completion later (`mode=defer`, [`crate::Hooks::defer`]).
    pub defer: bool,
    /// Reached synchronously inside the guest's doorbell write, on the vCPU that rang: a stall
    /// there holds that vCPU, so a backend that absorbs doorbells (ioeventfd) must keep the
    /// device's doorbells as exits while a rule targets the point.
    pub doorbell: bool,
    /// Reached about once per I/O (doorbells, completions, MAP/UNMAP): the timeline samples it
    /// instead of recording every arrival.
    pub hot: bool,
}

impl PointDecl {
    /// A point with no special property.
    pub fn new(name: impl Into<String>) -> Self {
        PointDecl {
            name: name.into(),
            defer: false,
            doorbell: false,
            hot: false,
        }
    }

    /// The model can defer this completion.
    #[must_use]
    pub fn deferrable(mut self) -> Self {
        self.defer = true;
        self
    }

    /// Reached inside the doorbell write.
    #[must_use]
    pub fn on_doorbell(mut self) -> Self {
        self.doorbell = true;
        self
    }

    /// Reached about once per I/O.
    #[must_use]
    pub fn hot(mut self) -> Self {
        self.hot = true;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_set_only_their_property() {
        let p = PointDecl::new("x");
        assert!(!p.defer && !p.doorbell && !p.hot);
        let p = PointDecl::new("x").deferrable().on_doorbell().hot();
        assert!(p.defer && p.doorbell && p.hot);
        assert_eq!(p.name, "x");
    }
}
