//! wsrelay-operator: the `WebsocketGateway` API and its reconciler.
