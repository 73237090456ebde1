package main

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// Request is what the relay sends on the authorization subject (docs/protocol.md section 3,
// "Backend request").
type Request struct {
	Op         string            `json:"op"` // "subscribe", "publish" or "connect"
	Channel    string            `json:"channel"`
	Vars       map[string]string `json:"vars"`
	Claims     map[string]any    `json:"claims"`
	Connection string            `json:"connection"`
}

// Reply is the backend's answer. Only Allow is required; the relay passes Reason and Code to
// the client in the error, and Data in the subscribe's ok (or the connect's welcome).
type Reply struct {
	Allow     bool   `json:"allow"`
	Reason    string `json:"reason,omitempty"`
	Code      int    `json:"code,omitempty"` // 4000-4999, the client's appCode
	Data      any    `json:"data,omitempty"`
	ExpiresAt int64  `json:"expiresAt,omitempty"`
}

// Application codes this backend answers with (the relay passes them as appCode).
const (
	CodeBadRequest = 4000
	CodeAnonymous  = 4010
	CodeNotMember  = 4031
	CodeNotOwner   = 4032
	CodeBanned     = 4033
	CodeReadOnly   = 4034
	CodeUnknown    = 4040
)

// Order is one order of the in-memory table.
type Order struct {
	Owner string
	State string
}

// Table is the application data the decisions are made from: in a real backend, a database.
type Table struct {
	Rooms  map[string][]string // user -> rooms they may join
	Orders map[string]Order    // order id -> owner and state
	Banned map[string]bool     // users refused at connect
}

// members counts the users who may join room.
func (t *Table) members(room string) int {
	n := 0
	for _, rooms := range t.Rooms {
		if slices.Contains(rooms, room) {
			n++
		}
	}
	return n
}

func deny(code int, reason string) Reply {
	return Reply{Allow: false, Code: code, Reason: reason}
}

// Decide answers one request. It never panics on odd input: anything it does not understand
// is denied with a reason, which is what the relay shows the client.
func (t *Table) Decide(req Request) Reply {
	sub, _ := req.Claims["sub"].(string)
	if sub == "" {
		return deny(CodeAnonymous, "sign in first")
	}
	switch req.Op {
	case "connect":
		if t.Banned[sub] {
			return deny(CodeBanned, "user is banned")
		}
		// The welcome carries what the user may join, so the client need not ask.
		rooms := t.Rooms[sub]
		if rooms == nil {
			rooms = []string{}
		}
		return Reply{Allow: true, Data: map[string]any{"rooms": rooms}}
	case "subscribe", "publish":
	default:
		return deny(CodeBadRequest, fmt.Sprintf("unknown op %q", req.Op))
	}

	kind, _, _ := strings.Cut(req.Channel, ".")
	switch kind {
	case "rooms": // binding rooms.{room}
		room := req.Vars["room"]
		if room == "" {
			return deny(CodeBadRequest, "no room in the channel")
		}
		if !slices.Contains(t.Rooms[sub], room) {
			return deny(CodeNotMember, "not a member of room "+room)
		}
		if req.Op == "publish" {
			return Reply{Allow: true}
		}
		return Reply{Allow: true, Data: map[string]any{"room": room, "members": t.members(room)}}
	case "orders": // binding orders.{id}
		id := req.Vars["id"]
		order, ok := t.Orders[id]
		if id == "" || !ok {
			return deny(CodeUnknown, "no such order")
		}
		if order.Owner != sub {
			return deny(CodeNotOwner, "not your order")
		}
		if req.Op == "publish" {
			return deny(CodeReadOnly, "orders are read-only")
		}
		return Reply{Allow: true, Data: map[string]any{"order": id, "state": order.State}}
	default:
		return deny(CodeUnknown, "unknown channel")
	}
}

// DecideBytes parses a request payload and decides it; a payload that is not a request is
// denied (and reported in err, for the log).
func (t *Table) DecideBytes(payload []byte) (Request, Reply, error) {
	var req Request
	if err := json.Unmarshal(payload, &req); err != nil {
		return req, deny(CodeBadRequest, "malformed request"), err
	}
	return req, t.Decide(req), nil
}

// ParseRooms reads "alice:1,2;bob:2": alice may join rooms 1 and 2, bob room 2.
func ParseRooms(s string) (map[string][]string, error) {
	rooms := map[string][]string{}
	for entry := range strings.SplitSeq(s, ";") {
		entry = strings.TrimSpace(entry)
		if entry == "" {
			continue
		}
		user, list, ok := strings.Cut(entry, ":")
		if !ok || user == "" {
			return nil, fmt.Errorf("rooms: %q is not user:room,room", entry)
		}
		for room := range strings.SplitSeq(list, ",") {
			if room = strings.TrimSpace(room); room != "" {
				rooms[user] = append(rooms[user], room)
			}
		}
	}
	return rooms, nil
}

// ParseOrders reads "42:alice:shipped;43:bob:open": order 42 is alice's and shipped.
func ParseOrders(s string) (map[string]Order, error) {
	orders := map[string]Order{}
	for entry := range strings.SplitSeq(s, ";") {
		entry = strings.TrimSpace(entry)
		if entry == "" {
			continue
		}
		f := strings.Split(entry, ":")
		if len(f) != 3 || f[0] == "" || f[1] == "" {
			return nil, fmt.Errorf("orders: %q is not id:owner:state", entry)
		}
		orders[f[0]] = Order{Owner: f[1], State: f[2]}
	}
	return orders, nil
}

// ParseBanned reads "mallory,trudy".
func ParseBanned(s string) map[string]bool {
	banned := map[string]bool{}
	for user := range strings.SplitSeq(s, ",") {
		if user = strings.TrimSpace(user); user != "" {
			banned[user] = true
		}
	}
	return banned
}
