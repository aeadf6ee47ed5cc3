package server

import (
	"github.com/kvrecall/kvrecall/internal/chat"
	"github.com/kvrecall/kvrecall/runtime"
)

// The chat template code lives in internal/chat, shared with the kvrecall
// library; these names keep the handlers unchanged.
type (
	message      = chat.Message
	chatTemplate = chat.Template
)

// Fallback is the documented format used when a model has no chat template.
const Fallback = chat.Fallback

func newChatTemplate(m *runtime.Model) (*chatTemplate, error) { return chat.ForModel(m) }
