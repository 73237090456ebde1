//! wsrelay-operator: the `WebsocketGateway` API and its reconciler.
//!
//! The reconcile pipeline, one module per stage (only the ends touch the API server):
//! [`fetch`] referenced Secrets -> [`validate`] -> [`build`] desired objects (pure) ->
//! [`apply`] them (server-side apply, orphan sweep) -> [`status`].

pub mod api;
pub mod build;
