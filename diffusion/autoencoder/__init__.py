"""The KL autoencoder of latent diffusion, apart from its network (diffusion.models.vae):

  losses        LDM's autoencoder losses and the PatchGAN discriminator
  train_step    the (state, batch) -> (state, metrics) step of train.objective "vae"
  metrics       PSNR and SSIM per image
  decode        latents -> images, and reconstructions x -> x_hat
  sample_decoding  a latent run's sample function followed by its VAE's decoder
  encode        a dataset -> latent shards (`python -m diffusion.autoencoder.encode`)
  evaluate      PSNR / SSIM / rFID of a trained VAE (`python -m diffusion.autoencoder.evaluate`)

The reading side of the latent shards is diffusion.data.latents (LatentSource). This
file imports none of its submodules: import the one you need.
"""
