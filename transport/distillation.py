"""Masked knowledge distillation of a SiT (TinyFusion's recovery step on the transport).

Per step, one draw of (t, x0) gives x_t = alpha_t x1 + sigma_t x0 (transport.loss); the student
and the teacher (no grad) see the same x_t, t, labels and classifier-free label drops, and

    kd   = mean((out_s - out_t)^2)        the model outputs: velocities for SiT's default
    gt   = the student's transport loss    (transport.loss.losses_from_output, mean over samples)
    feat = the masked feature loss of diffusion/distillation.py on the aligned block pairs
    loss = alpha * kd + (1 - alpha) * gt + beta * feat

The same terms and weights as the DiT's Masked KD; a SiT has no learned variance, so kd has no
variance term.
"""
import torch

from diffusion.distillation import draw_label_drops, student_and_teacher_outputs
from transport.loss import losses_from_output, sample_time_and_noise
from transport.paths import interpolate


def transport_kd_losses(student, teacher, transport, x1, y, *, alpha, beta, mask_sigma, layer_pairs,
                        class_dropout_prob, t=None, noise=None, force_drop_ids=None):
    """The Masked-KD losses of one batch of data x1: dict of fp32 scalars loss / gt / kd / feat.

    `student` and `teacher` are called as model(x_t, t, y=, force_drop_ids=, hidden_indices=);
    t and the noise (transport.sample_time_and_noise, global generator) and then the label drops
    are drawn here unless given."""
    if (t is None) != (noise is None):
        raise ValueError("pass both t and noise, or neither")
    if t is None:
        t, noise = sample_time_and_noise(transport, x1)
    if force_drop_ids is None:
        force_drop_ids = draw_label_drops(x1.shape[0], class_dropout_prob, x1.device)
    xt, ut = interpolate(transport.path, t, noise, x1)
    student_output, teacher_output, feat = student_and_teacher_outputs(
        student, teacher, xt, t, y, force_drop_ids, layer_pairs=layer_pairs if beta > 0 else None,
        mask_sigma=mask_sigma)
    student_output, teacher_output = student_output.float(), teacher_output.detach().float()
    kd = torch.mean((student_output - teacher_output) ** 2)
    gt = losses_from_output(transport, student_output, xt=xt.float(), ut=ut.float(), t=t, noise=noise.float()).mean()
    loss = alpha * kd + (1.0 - alpha) * gt + beta * feat
    return {"loss": loss, "gt": gt, "kd": kd, "feat": feat}
