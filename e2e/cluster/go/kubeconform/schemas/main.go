// Command schemas writes the JSON schemas kubeconform validates against, offline: one file
// per kind in kubeconform's layout ({kind}-{group prefix}-{version}.json), in a loose
// variant (standalone/) and a strict one (standalone-strict/, every object with declared
// properties gets additionalProperties: false), the way the published
// kubernetes-json-schema sets are made.
//
//	schemas -out DIR [-swagger swagger.json] [-crd crd.yaml ...]
//
// -swagger: Kubernetes' OpenAPI v2 document (api/openapi-spec/swagger.json); every
// definition with x-kubernetes-group-version-kind becomes a schema.
// -crd: a CustomResourceDefinition (YAML, several documents allowed); every served version
// becomes a schema, with metadata checked as ObjectMeta when -swagger is given.
//
// Each file is self-contained: the definitions it refers to are copied into its own
// "definitions", so recursive types (JSONSchemaProps) need no other file.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"sigs.k8s.io/yaml"
)

const (
	objectMeta = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
	quantity   = "io.k8s.apimachinery.pkg.api.resource.Quantity"
)

type schema = map[string]any

type crdFiles []string

func (c *crdFiles) String() string     { return strings.Join(*c, ",") }
func (c *crdFiles) Set(v string) error { *c = append(*c, v); return nil }

func main() {
	out := flag.String("out", "", "output directory")
	swagger := flag.String("swagger", "", "Kubernetes swagger.json")
	var crds crdFiles
	flag.Var(&crds, "crd", "CustomResourceDefinition YAML (repeatable)")
	flag.Parse()
	if *out == "" || (*swagger == "" && len(crds) == 0) {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*out, *swagger, crds); err != nil {
		fmt.Fprintln(os.Stderr, "schemas:", err)
		os.Exit(1)
	}
}

func run(out, swaggerPath string, crds []string) error {
	defs := map[string]any{}
	if swaggerPath != "" {
		raw, err := os.ReadFile(swaggerPath)
		if err != nil {
			return err
		}
		var doc struct {
			Definitions map[string]any `json:"definitions"`
		}
		if err := json.Unmarshal(raw, &doc); err != nil {
			return fmt.Errorf("%s: %w", swaggerPath, err)
		}
		defs = doc.Definitions
		n := 0
		names := make([]string, 0, len(defs))
		for name := range defs {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			def := defs[name].(schema)
			gvks, _ := def["x-kubernetes-group-version-kind"].([]any)
			for _, g := range gvks {
				gvk := g.(schema)
				group, _ := gvk["group"].(string)
				version, _ := gvk["version"].(string)
				kind, _ := gvk["kind"].(string)
				// The root is a copy of the definition with kind and apiVersion pinned.
				top := deepCopy(def).(schema)
				pinKind(top, group, version, kind)
				if err := write(out, group, version, kind, top, defs, name); err != nil {
					return err
				}
				n++
			}
		}
		fmt.Fprintf(os.Stderr, "schemas: %d kinds from %s\n", n, swaggerPath)
	}
	for _, path := range crds {
		if err := fromCRD(out, path, defs); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
	}
	return nil
}

// fromCRD writes one schema per version of every CRD in the file.
func fromCRD(out, path string, defs map[string]any) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	for _, doc := range bytes.Split(raw, []byte("\n---")) {
		if len(bytes.TrimSpace(bytes.TrimPrefix(doc, []byte("---")))) == 0 {
			continue
		}
		var crd struct {
			Kind string `json:"kind"`
			Spec struct {
				Group string `json:"group"`
				Names struct {
					Kind string `json:"kind"`
				} `json:"names"`
				Versions []struct {
					Name   string `json:"name"`
					Schema struct {
						OpenAPIV3Schema schema `json:"openAPIV3Schema"`
					} `json:"schema"`
				} `json:"versions"`
			} `json:"spec"`
		}
		if err := yaml.Unmarshal(doc, &crd); err != nil {
			return err
		}
		if crd.Kind != "CustomResourceDefinition" {
			return fmt.Errorf("a %q, not a CustomResourceDefinition", crd.Kind)
		}
		for _, v := range crd.Spec.Versions {
			if v.Schema.OpenAPIV3Schema == nil {
				return fmt.Errorf("%s/%s has no openAPIV3Schema", crd.Spec.Group, v.Name)
			}
			top := fromStructural(v.Schema.OpenAPIV3Schema).(schema)
			props, _ := top["properties"].(schema)
			if props == nil {
				props = schema{}
				top["properties"] = props
			}
			// Every object has these, whether or not the CRD's schema lists them.
			props["apiVersion"] = schema{"type": "string"}
			props["kind"] = schema{"type": "string"}
			if _, ok := props["metadata"]; !ok {
				props["metadata"] = schema{"type": "object"}
			}
			pinKind(top, crd.Spec.Group, v.Name, crd.Spec.Names.Kind)
			// A CRD only says `metadata: {type: object}`; the API server checks it as
			// ObjectMeta, and so do we when the swagger is at hand.
			if _, ok := defs[objectMeta]; ok {
				props["metadata"] = schema{"$ref": "#/definitions/" + objectMeta}
			}
			if err := write(out, crd.Spec.Group, v.Name, crd.Spec.Names.Kind, top, defs, ""); err != nil {
				return err
			}
		}
	}
	return nil
}

// fromStructural turns a CRD's structural schema into plain JSON schema: Kubernetes'
// extensions (int-or-string, nullable) become what they mean.
func fromStructural(v any) any {
	switch n := v.(type) {
	case map[string]any:
		out := schema{}
		for k, val := range n {
			out[k] = fromStructural(val)
		}
		if out["x-kubernetes-int-or-string"] == true {
			delete(out, "type")
			out["oneOf"] = []any{schema{"type": "string"}, schema{"type": "integer"}}
		}
		if out["nullable"] == true {
			if t, ok := out["type"].(string); ok {
				out["type"] = []any{t, "null"}
			}
		}
		return out
	case []any:
		out := make([]any, len(n))
		for i, val := range n {
			out[i] = fromStructural(val)
		}
		return out
	default:
		return v
	}
}

// pinKind makes kind and apiVersion accept only this kind's values.
func pinKind(top schema, group, version, kind string) {
	props, _ := top["properties"].(schema)
	if props == nil {
		return
	}
	apiVersion := version
	if group != "" {
		apiVersion = group + "/" + version
	}
	if _, ok := props["kind"]; ok {
		props["kind"] = schema{"type": "string", "enum": []any{kind}}
	}
	if _, ok := props["apiVersion"]; ok {
		props["apiVersion"] = schema{"type": "string", "enum": []any{apiVersion}}
	}
}

// write stores the loose and the strict variant of one kind, each with the definitions it
// reaches (self is the definition the root was copied from, so its self-references work).
func write(out, group, version, kind string, top schema, defs map[string]any, self string) error {
	name := strings.ToLower(kind)
	if group != "" {
		name += "-" + strings.ToLower(strings.Split(group, ".")[0])
	}
	name += "-" + strings.ToLower(version) + ".json"
	for _, strict := range []bool{false, true} {
		reached := map[string]bool{}
		if self != "" {
			reached[self] = true
		}
		collect(top, defs, reached)
		root := convert(deepCopy(top), strict, false).(schema)
		if len(reached) > 0 {
			d := schema{}
			for r := range reached {
				d[r] = convert(deepCopy(defs[r]), strict, r == quantity)
			}
			root["definitions"] = d
		}
		dir := filepath.Join(out, "standalone")
		if strict {
			dir += "-strict"
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		b, err := json.MarshalIndent(root, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, name), append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// collect adds every definition v refers to, transitively.
func collect(v any, defs map[string]any, reached map[string]bool) {
	switch n := v.(type) {
	case map[string]any:
		if ref, ok := n["$ref"].(string); ok {
			name := strings.TrimPrefix(ref, "#/definitions/")
			if !reached[name] {
				if def, ok := defs[name]; ok {
					reached[name] = true
					collect(def, defs, reached)
				}
			}
		}
		for _, val := range n {
			collect(val, defs, reached)
		}
	case []any:
		for _, val := range n {
			collect(val, defs, reached)
		}
	}
}

// convert rewrites OpenAPI v2 idioms into JSON schema: int-or-string and Quantity accept
// strings and numbers (YAML writes `port: 80` and `cpu: 1`), optional fields accept null
// (as the API server does), and in strict mode objects with declared properties refuse
// others.
func convert(v any, strict, isQuantity bool) any {
	switch n := v.(type) {
	case map[string]any:
		if isQuantity {
			return schema{
				"description": n["description"],
				"oneOf":       []any{schema{"type": "string"}, schema{"type": "number"}},
			}
		}
		if n["format"] == "int-or-string" {
			delete(n, "type")
			delete(n, "format")
			n["oneOf"] = []any{schema{"type": "string"}, schema{"type": "integer"}}
		}
		for k, val := range n {
			switch k {
			case "properties":
				props := val.(map[string]any)
				required := map[string]bool{}
				if req, ok := n["required"].([]any); ok {
					for _, r := range req {
						required[r.(string)] = true
					}
				}
				for p, ps := range props {
					c := convert(ps, strict, false)
					if m, ok := c.(map[string]any); ok && !required[p] {
						if t, ok := m["type"].(string); ok && t != "null" {
							m["type"] = []any{t, "null"}
						}
					}
					props[p] = c
				}
			case "enum", "required", "x-kubernetes-group-version-kind", "x-kubernetes-list-map-keys", "example", "default":
				// Values, not schemas.
			default:
				n[k] = convert(val, strict, false)
			}
		}
		if _, has := n["properties"]; has && strict {
			if _, set := n["additionalProperties"]; !set && n["x-kubernetes-preserve-unknown-fields"] != true {
				n["additionalProperties"] = false
			}
		}
		return n
	case []any:
		for i, val := range n {
			n[i] = convert(val, strict, false)
		}
		return n
	default:
		return v
	}
}

func deepCopy(v any) any {
	b, _ := json.Marshal(v)
	var out any
	_ = json.Unmarshal(b, &out)
	return out
}
