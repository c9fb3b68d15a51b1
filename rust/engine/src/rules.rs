//! The rule set a proxy runs between the phases: its filters and its routes, held together so
//! that a reload swaps both at once. Each request loads the set in effect once, when it
//! arrives, and keeps it to its end: its filters, its route and its response filters all come
//! from one set, and a request in flight when a reload lands finishes on the set it began with.

use std::any::Any;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::filters::Filters;
use crate::route::Router;

/// One set of filters and routes.
#[derive(Clone, Default)]
pub struct Rules {
    /// Declarative filters; `None` (no work at all) for none.
    pub filters: Option<Arc<Filters>>,
    /// Routes, chosen after the request filters, with what the embedding layer keeps beside
    /// them; `None` for none.
    pub routes: Option<Arc<Routes>>,
}

/// No filters, no routes: the set of a session the proxy did not load one for.
static NO_RULES: Rules = Rules {
    filters: None,
    routes: None,
};

impl Rules {
    pub fn new(filters: Option<Arc<Filters>>, routes: Option<Arc<Routes>>) -> Self {
        Rules { filters, routes }
    }

    /// The empty set.
    pub fn none() -> &'static Rules {
        &NO_RULES
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_none() && self.routes.is_none()
    }
}

/// A router and whatever the embedding layer keeps beside its routes, made together so that
/// neither can be swapped without the other. The engine never looks at the data. (The Python
/// layer keeps its `Route` objects there, so that the `session.route` a request sees is
/// from the set its route index came from.)
pub struct Routes {
    router: Router,
    data: Option<Arc<dyn Any + Send + Sync>>,
}

impl Routes {
    /// Routes with no data beside them.
    pub fn new(router: Router) -> Self {
        Routes { router, data: None }
    }

    /// Routes with `data` beside them, one entry per route as the embedding layer sees fit.
    pub fn with_data(router: Router, data: Arc<dyn Any + Send + Sync>) -> Self {
        Routes {
            router,
            data: Some(data),
        }
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// What these routes were made with ([`Routes::with_data`]).
    pub fn data(&self) -> Option<&Arc<dyn Any + Send + Sync>> {
        self.data.as_ref()
    }
}

impl From<Router> for Routes {
    fn from(router: Router) -> Self {
        Routes::new(router)
    }
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("router", &self.router)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field("filters", &self.filters)
            .field("routes", &self.routes)
            .finish()
    }
}

/// The swappable holder of a proxy's rule set, shared by the proxy and whoever reloads it
/// (clones share one holder). A load is one atomic reference count increment; a reload never
/// waits for requests, nor a request for a reload.
#[derive(Clone)]
pub struct RulesHandle(Arc<ArcSwap<Rules>>);

impl RulesHandle {
    pub fn new(rules: Rules) -> Self {
        RulesHandle(Arc::new(ArcSwap::from_pointee(rules)))
    }

    /// The set in effect now, for one request to keep to its end.
    #[inline]
    pub fn load(&self) -> Arc<Rules> {
        self.0.load_full()
    }

    /// Make `rules` the set every request from now on runs; requests in flight finish on
    /// the one they loaded.
    pub fn store(&self, rules: Rules) {
        self.0.store(Arc::new(rules));
    }

    /// Replace the set with what `change` makes of the current one, atomically even when
    /// several threads reload at once (each change is applied to the latest set). For
    /// replacing the filters and keeping the routes, or the other way round.
    pub fn update(&self, change: impl Fn(&Rules) -> Rules) {
        self.0.rcu(|current| change(current));
    }
}

impl Default for RulesHandle {
    fn default() -> Self {
        RulesHandle::new(Rules::default())
    }
}

impl From<Rules> for RulesHandle {
    fn from(rules: Rules) -> Self {
        RulesHandle::new(rules)
    }
}

impl std::fmt::Debug for RulesHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RulesHandle").field(&*self.0.load()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loaded_set_outlives_a_reload_and_later_loads_see_the_new_one() {
        let handle = RulesHandle::default();
        let before = handle.load();
        let filters = Arc::new(Filters::default());
        handle.update(|current| Rules {
            filters: Some(filters.clone()),
            ..current.clone()
        });
        assert!(before.filters.is_none(), "a loaded set never changes");
        let after = handle.load();
        assert!(after
            .filters
            .as_ref()
            .is_some_and(|f| Arc::ptr_eq(f, &filters)));
        // A clone shares the holder: a reload through it reaches the proxy's.
        handle.clone().store(Rules::default());
        assert!(handle.load().is_empty());
    }

    fn no_routes() -> Router {
        Router::new(Vec::new()).unwrap()
    }

    #[test]
    fn new_routes_bring_their_own_data_and_keeping_the_routes_keeps_it() {
        let routes_with = |tag: &'static str| {
            let data: Arc<dyn Any + Send + Sync> = Arc::new(tag);
            Some(Arc::new(Routes::with_data(no_routes(), data)))
        };
        let tag_of = |rules: &Rules| {
            let data = rules.routes.as_ref()?.data()?.clone();
            data.downcast::<&'static str>().ok().map(|tag| *tag)
        };
        let handle = RulesHandle::new(Rules::new(None, routes_with("old")));
        handle.update(|current| Rules {
            routes: Some(Arc::new(Routes::new(no_routes()))),
            ..current.clone()
        });
        assert_eq!(
            tag_of(&handle.load()),
            None,
            "new routes never keep the old data"
        );
        handle.update(|current| Rules {
            routes: routes_with("new"),
            ..current.clone()
        });
        handle.update(|current| Rules {
            filters: Some(Arc::new(Filters::default())),
            ..current.clone()
        });
        assert_eq!(tag_of(&handle.load()), Some("new"));
    }
}
