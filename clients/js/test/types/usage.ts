// Compiled (not run) by `npm test` against dist/esm/index.d.ts: the public types as an
// application uses them. A type error here is a broken declaration.
import {
  Client,
  WsrelayError,
  type ConnectedContext,
  type DisconnectedContext,
  type Message,
  type Occupancy,
  type PresenceMember,
  type PresenceSync,
  type SubscribedContext,
  type Subscription,
} from "../../dist/esm/index.js";

const client = new Client({
  url: () => "wss://relay.example.com/ws",
  getToken: async () => "jwt",
  getSubscriptionToken: async (channel: string) => (channel.startsWith("orders.") ? "sub-jwt" : null),
  pingIntervalMs: 15_000,
});
client.on("connected", (c: ConnectedContext) => c.data);
client.on("connected", (c: ConnectedContext) => c.transport.toUpperCase());
client.on("disconnected", (d: DisconnectedContext) => (d.willReconnect ? d.delayMs ?? 0 : d.code));
client.on("error", ({ kind, error }) => `${kind} ${String(error.code)} ${error.reason}`);
client.on("drain", (d) => d.reconnectAfterMs + 1);
const sub: Subscription = client.subscribe("me.notify", {
  onMessage: (m: Message) => (m.format === "binary" ? (m.data as Uint8Array).length : m.data),
  onSubscribed: (ctx: SubscribedContext) => ctx.resubscribed && !ctx.recovered,
  since: { epoch: "e", seq: 1 },
});
sub.on("dropped", (d) => d.count);
sub.on("token", (t) => t.expiresAt ?? 0);
sub.on("unsubscribed", (u) => (u.reason === "forbidden" ? u.appCode ?? u.code : 0));
const order: Subscription = client.subscribe("orders.42", {
  getToken: async (channel: string) => `token-for-${channel}`,
  token: "first-jwt",
  onSubscribed: (ctx: SubscribedContext) => ctx.data,
});
void order;
// A server-side subscription: handlers attached from the client's event.
client.on("subscribed", ({ channel, byServer, subscription, resubscribed }) => {
  const server: true = byServer;
  subscription.on("message", (m: Message) => `${channel} ${String(m.data)} ${String(server)} ${String(resubscribed)}`);
  return subscription.byServer;
});
const room: Subscription = client.subscribe("rooms.7", { presence: true, presencePageSize: 500 });
room.on("join", (m: PresenceMember) => `${m.key} ${String(m.info["name"])} ${m.clients}`);
room.on("leave", (m: PresenceMember) => m.key);
room.on("occupancy", (o: Occupancy) => (o.events === false ? o.users : o.clients));
room.on("presence", (p: PresenceSync) => (p.initial ? p.members.size : p.occupancy.users));
const members: ReadonlyMap<string, PresenceMember> = room.presence();
const alice: PresenceMember | undefined = members.get("alice");
void alice;
const occ: Occupancy | undefined = room.occupancy();
const synced: boolean = room.presenceSynced;
void occ;
void synced;
const pos: { epoch: string; seq: number } | undefined = sub.position;
void pos;
async function main(): Promise<void> {
  client.connect();
  const r = await client.publish("chat.lobby", { text: "hi" });
  const seq: number | undefined = r.seq;
  void seq;
  await sub.ready(5000);
  const list: ReadonlyMap<string, PresenceMember> = await room.fetchPresence();
  for (const [key, m] of list) void `${key}: ${JSON.stringify(m.info)}`;
  try {
    await client.publishText("chat.lobby", "raw");
    await client.publish("orders.42", { x: 1 }, { token: "sub-jwt" });
  } catch (e) {
    if (e instanceof WsrelayError && e.code === 403 && e.appCode === 4001) client.disconnect();
  }
}
void main;
