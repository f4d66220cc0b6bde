"""The two-modality toy model several CGGM tests share: linear encoders (10 and 12 inputs, 16 features
each), a concatenation head with 4 classes; returns the prediction and the features the head consumed."""

from __future__ import annotations

import torch
from torch import nn

from cggm import Task

TASK = Task("classification", num_outputs=4)


class TwoModal(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio, self.video = nn.Linear(10, 16), nn.Linear(12, 16)
        self.fc = nn.Linear(32, 4)

    def forward(self, a, v):
        h = [torch.relu(self.audio(a)), torch.relu(self.video(v))]
        return self.fc(torch.cat(h, dim=1)), h
