// Pins the Prometheus Pushgateway that tests/test_metrics_export.py pushes to (`make pushgateway`).
//go:build tools

package tools

import _ "github.com/prometheus/pushgateway"
