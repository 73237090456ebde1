package main

import (
	"encoding/json"
	"reflect"
	"testing"
)

func entry(t *testing.T, value string) Entry {
	t.Helper()
	e, err := ParseEntry([]byte(value), "rooms.7")
	if err != nil {
		t.Fatalf("%s: %v", value, err)
	}
	return e
}

func TestWatchFilterIsTheChannelInBase64URLWithoutPadding(t *testing.T) {
	// docs/protocol.md section 10's example.
	if got := WatchFilter("rooms.7"); got != "pres.cm9vbXMuNw.>" {
		t.Fatalf("%s", got)
	}
	// '?' and '>' encode to '_' and '-' in the URL alphabet, never '/' or '+'.
	if got := WatchFilter("a?>"); got != "pres.YT8-.>" {
		t.Fatalf("%s", got)
	}
}

func TestParseEntryTakesVersion1OfTheChannelAndSkipsTheRest(t *testing.T) {
	e := entry(t, `{"v":1,"channel":"rooms.7","key":"alice","info":{"name":"Alice"},"since":1767225600000,"later":true}`)
	if e.Key != "alice" || string(e.Info) != `{"name":"Alice"}` || e.Since != 1767225600000 {
		t.Fatalf("%+v", e)
	}
	if e := entry(t, `{"v":1,"channel":"rooms.7","key":"bob"}`); string(e.Info) != `{}` {
		t.Fatalf("no info is {}: %s", e.Info)
	}
	for _, bad := range []string{
		`not json`,
		`{"v":2,"channel":"rooms.7","key":"alice","info":{}}`,
		`{"channel":"rooms.7","key":"alice"}`,
		`{"v":1,"channel":"rooms.8","key":"alice"}`,
		`{"v":1,"channel":"rooms.7","key":""}`,
	} {
		if _, err := ParseEntry([]byte(bad), "rooms.7"); err == nil {
			t.Errorf("%s: taken", bad)
		}
	}
}

func TestTabsOfOneKeyAreOneMemberAndOnlyItsFirstAndLastConnectionAreEvents(t *testing.T) {
	m := NewMembers()
	alice := entry(t, `{"v":1,"channel":"rooms.7","key":"alice","info":{"name":"Alice"},"since":1}`)
	bob := entry(t, `{"v":1,"channel":"rooms.7","key":"bob","info":{"name":"Bob"},"since":2}`)

	if got := m.Delete("pres.cm9vbXMuNw.r1.9"); got != nil {
		t.Fatalf("an old delete marker is no event: %v", got)
	}
	want := []Change{{Event: "join", Key: "alice", Info: json.RawMessage(`{"name":"Alice"}`)}}
	if got := m.Put("pres.cm9vbXMuNw.r1.1", alice); !reflect.DeepEqual(got, want) {
		t.Fatalf("%v", got)
	}
	if got := m.Put("pres.cm9vbXMuNw.r2.5", alice); got != nil {
		t.Fatalf("a second tab is no join: %v", got)
	}
	if got := m.Put("pres.cm9vbXMuNw.r1.1", alice); got != nil {
		t.Fatalf("an entry written again is no join: %v", got)
	}
	m.Put("pres.cm9vbXMuNw.r1.2", bob)
	wantList := []Member{
		{Key: "alice", Info: json.RawMessage(`{"name":"Alice"}`), Clients: 2},
		{Key: "bob", Info: json.RawMessage(`{"name":"Bob"}`), Clients: 1},
	}
	if got := m.List(); !reflect.DeepEqual(got, wantList) {
		t.Fatalf("%v", got)
	}

	if got := m.Delete("pres.cm9vbXMuNw.r1.1"); got != nil {
		t.Fatalf("alice has a tab left: %v", got)
	}
	want = []Change{{Event: "leave", Key: "alice", Info: json.RawMessage(`{"name":"Alice"}`)}}
	if got := m.Delete("pres.cm9vbXMuNw.r2.5"); !reflect.DeepEqual(got, want) {
		t.Fatalf("%v", got)
	}
	if got := m.Delete("pres.cm9vbXMuNw.r2.5"); got != nil {
		t.Fatalf("a second delete is no event: %v", got)
	}
	m.Delete("pres.cm9vbXMuNw.r1.2")
	if got, _ := json.Marshal(m.List()); string(got) != `[]` {
		t.Fatalf("no members print as []: %s", got)
	}
}
