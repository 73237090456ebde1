export {
  Client,
  type ClientOptions,
  type ClientState,
  type ClientEvents,
  type Clock,
  type ConnectedContext,
  type ConnectingContext,
  type DisconnectedContext,
  type ErrorKind,
  type PublishOptions,
  type PublishResult,
  type ServerSubscribedContext,
} from "./client.js";
export {
  Subscription,
  type Message,
  type PresenceSync,
  type SubscribedContext,
  type SubscribingContext,
  type SubscriptionEvents,
  type SubscriptionOptions,
  type SubscriptionState,
  type UnsubscribedContext,
} from "./subscription.js";
export { WsrelayError, type ErrorCode } from "./errors.js";
export { backoffDelay, backoffCap } from "./backoff.js";
export { jwtClaims, jwtExpiryMs, tokenExpired, refreshDelayMs } from "./token.js";
export { closePolicy, LocalClose, type ClosePolicy } from "./closecodes.js";
export { PositionTracker, type Position, type Verdict } from "./position.js";
export {
  PresenceTracker,
  compareKeys,
  type Occupancy,
  type PresenceDiff,
  type PresenceMember,
} from "./presence.js";
export {
  PROTOCOL,
  parseFrame,
  type OccupancyFrame,
  type PresenceEventFrame,
  type PresenceMemberEntry,
  type PresencePage,
  type ServerFrame,
} from "./protocol.js";
export {
  sseTransport,
  sseUrl,
  webSocketTransport,
  type EventSourceConstructor,
  type EventSourceLike,
  type SseTransportOptions,
  type Transport,
  type TransportFactory,
  type TransportHandlers,
  type TransportParams,
  type WebSocketConstructor,
  type WebSocketLike,
} from "./transport.js";
