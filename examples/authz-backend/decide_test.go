package main

import (
	"encoding/json"
	"reflect"
	"testing"
)

func testTable(t *testing.T) *Table {
	t.Helper()
	table, err := newTable(options{
		rooms:  "alice:1,2;bob:2",
		orders: "42:alice:shipped;43:bob:open",
		banned: "mallory",
	})
	if err != nil {
		t.Fatal(err)
	}
	return table
}

func claims(sub string) map[string]any { return map[string]any{"sub": sub, "exp": 1767225600} }

func TestDecide(t *testing.T) {
	table := testTable(t)
	cases := []struct {
		name string
		req  Request
		want Reply
	}{
		{"member joins room", Request{Op: "subscribe", Channel: "rooms.1", Vars: map[string]string{"room": "1"}, Claims: claims("alice")},
			Reply{Allow: true, Data: map[string]any{"room": "1", "members": 1}}},
		{"room data counts members", Request{Op: "subscribe", Channel: "rooms.2", Vars: map[string]string{"room": "2"}, Claims: claims("bob")},
			Reply{Allow: true, Data: map[string]any{"room": "2", "members": 2}}},
		{"non-member denied", Request{Op: "subscribe", Channel: "rooms.1", Vars: map[string]string{"room": "1"}, Claims: claims("bob")},
			Reply{Code: CodeNotMember, Reason: "not a member of room 1"}},
		{"member publishes, no data", Request{Op: "publish", Channel: "rooms.2", Vars: map[string]string{"room": "2"}, Claims: claims("alice")},
			Reply{Allow: true}},
		{"unknown user", Request{Op: "subscribe", Channel: "rooms.2", Vars: map[string]string{"room": "2"}, Claims: claims("carol")},
			Reply{Code: CodeNotMember, Reason: "not a member of room 2"}},
		{"room var missing", Request{Op: "subscribe", Channel: "rooms.1", Claims: claims("alice")},
			Reply{Code: CodeBadRequest, Reason: "no room in the channel"}},
		{"owner sees order state", Request{Op: "subscribe", Channel: "orders.42", Vars: map[string]string{"id": "42"}, Claims: claims("alice")},
			Reply{Allow: true, Data: map[string]any{"order": "42", "state": "shipped"}}},
		{"someone else's order", Request{Op: "subscribe", Channel: "orders.43", Vars: map[string]string{"id": "43"}, Claims: claims("alice")},
			Reply{Code: CodeNotOwner, Reason: "not your order"}},
		{"no such order", Request{Op: "subscribe", Channel: "orders.7", Vars: map[string]string{"id": "7"}, Claims: claims("alice")},
			Reply{Code: CodeUnknown, Reason: "no such order"}},
		{"orders are read-only", Request{Op: "publish", Channel: "orders.42", Vars: map[string]string{"id": "42"}, Claims: claims("alice")},
			Reply{Code: CodeReadOnly, Reason: "orders are read-only"}},
		{"unknown channel", Request{Op: "subscribe", Channel: "news.1", Claims: claims("alice")},
			Reply{Code: CodeUnknown, Reason: "unknown channel"}},
		{"anonymous", Request{Op: "subscribe", Channel: "rooms.1", Vars: map[string]string{"room": "1"}, Claims: map[string]any{}},
			Reply{Code: CodeAnonymous, Reason: "sign in first"}},
		{"sub not a string", Request{Op: "subscribe", Channel: "rooms.1", Vars: map[string]string{"room": "1"}, Claims: map[string]any{"sub": 42}},
			Reply{Code: CodeAnonymous, Reason: "sign in first"}},
		{"unknown op", Request{Op: "delete", Channel: "rooms.1", Claims: claims("alice")},
			Reply{Code: CodeBadRequest, Reason: `unknown op "delete"`}},
		{"connect allowed, welcome lists rooms", Request{Op: "connect", Claims: claims("alice")},
			Reply{Allow: true, Data: map[string]any{"rooms": []string{"1", "2"}}}},
		{"connect, no rooms", Request{Op: "connect", Claims: claims("carol")},
			Reply{Allow: true, Data: map[string]any{"rooms": []string{}}}},
		{"banned user refused at connect", Request{Op: "connect", Claims: claims("mallory")},
			Reply{Code: CodeBanned, Reason: "user is banned"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := table.Decide(c.req); !reflect.DeepEqual(got, c.want) {
				t.Errorf("Decide(%+v)\n got %+v\nwant %+v", c.req, got, c.want)
			}
		})
	}
}

// What goes over the wire: the relay reads these fields (docs/protocol.md section 3).
func TestReplyJSON(t *testing.T) {
	table := testTable(t)
	for _, c := range []struct{ payload, want string }{
		{`{"op":"subscribe","channel":"rooms.1","vars":{"room":"1"},"claims":{"sub":"alice","exp":1767225600},"connection":"relay-0/17"}`,
			`{"allow":true,"data":{"members":1,"room":"1"}}`},
		{`{"op":"subscribe","channel":"rooms.1","vars":{"room":"1"},"claims":{"sub":"bob"},"connection":"relay-0/18"}`,
			`{"allow":false,"reason":"not a member of room 1","code":4031}`},
		{`{"op":"connect","channel":null,"vars":{},"claims":{"sub":"mallory"},"connection":"relay-0/19"}`,
			`{"allow":false,"reason":"user is banned","code":4033}`},
	} {
		_, reply, err := table.DecideBytes([]byte(c.payload))
		if err != nil {
			t.Fatalf("%s: %v", c.payload, err)
		}
		got, _ := json.Marshal(reply)
		if string(got) != c.want {
			t.Errorf("%s\n got %s\nwant %s", c.payload, got, c.want)
		}
	}
}

// Whatever arrives, the answer is a deny with a reason, never a panic.
func TestMalformed(t *testing.T) {
	table := testTable(t)
	for _, payload := range []string{
		``, `null`, `[]`, `"x"`, `{`, `{"op":1}`, `{"vars":{"room":7}}`, `{"claims":"alice"}`,
		`{"op":"subscribe","channel":"rooms","claims":{"sub":"alice"}}`,
		`{"op":"subscribe","channel":"","vars":null,"claims":null}`,
	} {
		_, reply, _ := table.DecideBytes([]byte(payload))
		if reply.Allow || reply.Reason == "" {
			t.Errorf("%q: %+v, want a deny with a reason", payload, reply)
		}
	}
}

func TestParse(t *testing.T) {
	rooms, err := ParseRooms(" alice:1,2 ; bob:2;")
	if err != nil || !reflect.DeepEqual(rooms, map[string][]string{"alice": {"1", "2"}, "bob": {"2"}}) {
		t.Errorf("ParseRooms: %v %v", rooms, err)
	}
	if _, err := ParseRooms("alice"); err == nil {
		t.Error("ParseRooms(alice): no error")
	}
	if _, err := ParseOrders("42:alice"); err == nil {
		t.Error("ParseOrders(42:alice): no error")
	}
	if b := ParseBanned("mallory, trudy,"); !b["mallory"] || !b["trudy"] || len(b) != 2 {
		t.Errorf("ParseBanned: %v", b)
	}
}
